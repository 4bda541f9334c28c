"""Read selected tensors of a safetensors model directory, touching only the files that hold them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or from the single weights file's header."""
    index = model_dir / INDEX_FILE
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(single, framework="pt") as fh:
        return dict.fromkeys(fh.keys(), SINGLE_FILE)


def load_tensors(
    model_dir: Path,
    want: Callable[[str], bool],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors whose names satisfy `want`, file by file, converting dtype on the way.

    safetensors memory-maps each file and copies out only the requested tensors, so a server holding
    blocks 15..30 never materialises the others. `rename` maps a stored name to the one `want`
    and the result use (checkpoints saved from the base model lack its prefix).
    """
    by_file: dict[str, list[tuple[str, str]]] = {}
    for stored, file in weight_map(model_dir).items():
        name = rename(stored) if rename is not None else stored
        if want(name):
            by_file.setdefault(file, []).append((stored, name))
    out: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        with safe_open(model_dir / file, framework="pt", device="cpu") as fh:
            for stored, name in names:
                tensor = fh.get_tensor(stored)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[name] = tensor.to(device)
    return out


def tensor_bytes(
    model_dir: Path,
    prefixes: Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    rename: Callable[[str], str] | None = None,
) -> list[int]:
    """Bytes the tensors under each name prefix take once loaded (floating-point ones in
    `dtype`), read from the files' headers in one pass: nothing is loaded."""
    by_file: dict[str, list[tuple[str, int]]] = {}
    for name, file in weight_map(model_dir).items():
        canonical = rename(name) if rename is not None else name
        for i, prefix in enumerate(prefixes):
            if canonical.startswith(prefix):
                by_file.setdefault(file, []).append((name, i))
                break
    totals = [0] * len(prefixes)
    for file, names in sorted(by_file.items()):
        with safe_open(model_dir / file, framework="pt", device="cpu") as fh:
            for name, i in names:
                part = fh.get_slice(name)
                numel = 1
                for size in part.get_shape():
                    numel *= int(size)
                stored = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                keep = dtype if dtype is not None and stored.is_floating_point else stored
                totals[i] += numel * keep.itemsize
    return totals


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
