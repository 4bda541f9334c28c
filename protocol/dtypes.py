"""Wire dtype names, their element sizes and the torch/numpy dtypes behind them (torch loaded lazily)."""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - element bytes are sent as they lie in memory
    raise ImportError("protocol needs a little-endian host (docs/protocol.md, section 4)")

# Wire dtype name -> bytes per element (docs/protocol.md, "Dtypes"); element bytes are little-endian.
ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
# numpy dtype holding each wire dtype's bytes (numpy has no bfloat16: its bits travel as int16).
NUMPY: dict[str, np.dtype[Any]] = {
    name: np.dtype(np.int16 if name == "bfloat16" else name) for name in ITEMSIZE
}


@cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    # torch is imported on first use: `import protocol` alone must not import it (torch imports
    # asyncio and socket, and protocol is sans-I/O).
    import torch

    by_name = {name: getattr(torch, name) for name in ITEMSIZE}
    return by_name, {dt: name for name, dt in by_name.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name (KeyError if unknown)."""
    return _tables()[0][name]


def wire_name(dtype: torch.dtype) -> str | None:
    """The wire name of a torch dtype, or None if it cannot travel."""
    return _tables()[1].get(dtype)
