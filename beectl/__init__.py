"""beectl: the client of a beed swarm (CLI and Python API)."""

from beectl.api import (
    AutoDistributedModel,
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
    DistributedModelForCausalLM,
)
from beectl.distributed import DistributedModel, DistributedModelForSequenceClassification

__all__ = [
    "AutoDistributedModel",
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "DistributedModel",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
]
