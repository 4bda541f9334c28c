"""Networking both sides share: framed TCP streams, a connection to one peer, and the task tree."""
