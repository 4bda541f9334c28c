"""beed: serve transformer blocks of a large language model to a swarm (the daemon)."""

__version__ = "0.1.0"
