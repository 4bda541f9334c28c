"""One-time conversion of a GGUF model shipped in a wheel into a plain safetensors model directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CONVERTED_MARKER = "beed-converted.json"


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (two daemons converting at once wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, *, source_id: str) -> Path:
    """Convert `gguf_dir/gguf_file` into a safetensors model directory at `target`, once.

    The conversion writes into a temporary sibling directory and renames it into place, so a killed
    conversion leaves no half directory; concurrent callers serialise on a lock file.
    """
    if (target / CONVERTED_MARKER).exists():
        return target
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if (target / CONVERTED_MARKER).exists():
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        log.info("model.convert source=%s target=%s", source_id, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_into(gguf_dir, gguf_file, tmp)
            tmp.chmod(
                0o755
            )  # mkdtemp makes it private; the cache is readable like any model directory
            (tmp / CONVERTED_MARKER).write_text(
                json.dumps({"source": source_id, "gguf_file": gguf_file}) + "\n"
            )
            if target.exists():  # a stale directory without marker: a crash before rename
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("model.converted target=%s", target)
    return target


def _convert_into(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantise the GGUF with transformers and save config, float32 weights and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # transformers shows its own tqdm progress bar while dequantising the GGUF tensors.
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    # save_pretrained refuses a model loaded from GGUF ("quantized with gguf"), although its weights are
    # plain tensors now: rebuild the model from a config without quantization_config and copy them.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True, max_shard_size="200MB")
    tokenizer.save_pretrained(out)
