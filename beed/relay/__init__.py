"""Relaying for servers behind NAT: the relay's side (service.py, bandwidth.py)."""
