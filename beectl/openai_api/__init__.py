"""An OpenAI-compatible HTTP API in front of the swarm (`beectl api`)."""
