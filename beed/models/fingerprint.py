"""Model fingerprints: a short hash of the architecture config and the weight files' contents.

Servers whose fingerprints differ hold different weights and are never chained. The weight part hashes
every safetensors file in full once; the per-file digests are cached (keyed by path, size and mtime),
and files in the Hugging Face cache reuse the sha256 already in their blob name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

FINGERPRINT_CHARS = 24  # 96 bits of sha256, hex

# Config keys that describe how a file was produced or how it is run, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "architectures",
        "_commit_hash",
        "quantization_config",
    }
)
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")


def config_digest(config: dict[str, object]) -> str:
    """sha256 of the canonical JSON of the config without volatile keys."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_digest(path: Path, cache_file: Path | None = None) -> str:
    """sha256 of a file's bytes, reusing an HF blob name or a cached digest where possible."""
    real = path.resolve()
    if _HF_BLOB.match(real.name) and real.parent.name == "blobs":
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    cache: dict[str, str] = {}
    if cache_file is not None and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return cache[key]
    sha = hashlib.sha256()
    with open(real, "rb") as fh:
        while chunk := fh.read(1 << 22):
            sha.update(chunk)
    digest = sha.hexdigest()
    if cache_file is not None:
        cache[key] = digest
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, cache_file)
    return digest


def model_fingerprint(model_dir: Path, cache_file: Path | None = None) -> str:
    """Fingerprint of a model directory: its config plus the contents of all its weight files."""
    config = json.loads((model_dir / "config.json").read_text())
    sha = hashlib.sha256(b"beed-fingerprint-v1\0")
    sha.update(config_digest(config).encode())
    weight_files = sorted(p for p in model_dir.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weight files")
    for path in weight_files:
        sha.update(b"\0" + path.name.encode() + b"\0" + file_digest(path, cache_file).encode())
    return sha.hexdigest()[:FINGERPRINT_CHARS]


def served_fingerprint(base: str, quant: str) -> str:
    """The fingerprint a server announces: the files' fingerprint, suffixed with the weights'
    quantization when there is one (`<base>-int8`): servers of one files but different
    quantization hold different weights, and only a client that allows it chains them."""
    return base if quant == "none" else f"{base}-{quant}"


def fingerprint_quant(base: str, fingerprint: str) -> str | None:
    """The quantization a served fingerprint names for the files `base` ("none" for base
    itself), or None if it is not one of base's."""
    from beed.models.quant import QUANTS

    if fingerprint == base:
        return "none"
    quant = fingerprint.removeprefix(f"{base}-")
    return quant if fingerprint.startswith(f"{base}-") and quant in QUANTS[1:] else None


def served_fingerprints(base: str) -> list[str]:
    """Every fingerprint servers of the files `base` may announce (one per quantization)."""
    from beed.models.quant import QUANTS

    return [served_fingerprint(base, q) for q in QUANTS]
