"""Model sources, conversion, fingerprints and per-architecture adapters (no network, no asyncio)."""
