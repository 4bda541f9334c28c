"""Shared test helpers: bit-exact tensor comparison and a hypothesis strategy for tensors."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from protocol.dtypes import ITEMSIZE, torch_dtype
from protocol.tensors import raw_bytes


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The element bytes of t in row-major order (bit-exact identity of a tensor)."""
    return raw_bytes(t)[2].tobytes()


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert tensor_bytes(got) == tensor_bytes(want)
    assert got.is_contiguous()


def tensor_from_bytes(data: bytes, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = torch_dtype(dtype_name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw: st.DrawFn, dtypes: tuple[str, ...] = tuple(ITEMSIZE)) -> torch.Tensor:
    """Any supported dtype and shape (0-d and empty included), arbitrary bits, maybe strided."""
    name = draw(st.sampled_from(dtypes))
    shape = draw(SHAPES)
    numel = 1
    for d in shape:
        numel *= d
    size = numel * ITEMSIZE[name]
    if name == "bool":
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=numel, max_size=numel)))
    elif draw(st.booleans()):
        data = draw(st.binary(min_size=size, max_size=size))
    else:  # compressible: few distinct byte values
        data = bytes(
            draw(st.lists(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]), min_size=size, max_size=size))
        )
    t = tensor_from_bytes(data, name, shape)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, -1)  # non-contiguous
    elif t.dim() >= 1 and t.shape[0] > 1 and draw(st.booleans()):
        t = t[::2]  # strided slice
    return t
