"""Speculative decoding on the client: drafts proposed locally, verified in one step through the
swarm (docs/architecture.md, "Speculative decoding")."""
