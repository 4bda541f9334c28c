"""beectl: the client of a beed swarm (CLI and Python API)."""

from beectl.api import AutoDistributedModelForCausalLM, DistributedModelForCausalLM

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"]
