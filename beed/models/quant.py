"""Weight-only quantization of a span's linear layers (`beed serve --quant`).

- **int8**: each output row of a weight matrix scaled by its largest magnitude to [-127, 127]
  and rounded (symmetric, per output channel). 1 byte per weight plus one scale per row.
- **nf4**: 4-bit NormalFloat (the 16 quantiles of a normal distribution that QLoRA defines) in
  blocks of 64 weights, each block scaled by its largest magnitude. Two weights per byte plus
  one float32 scale per block: 4.5 bits per weight.

Only `nn.Linear` modules inside the blocks are quantized (attention and MLP projections, MoE
routers stay as they are: they are not `nn.Linear`s, nor are 3D expert tensors); norms, biases
and everything on the client stay in the served dtype. A quantized layer keeps its codes and
scales resident and converts them for each product, in the activations' dtype: int8 computes
`(x @ codes^T) * scale`, nf4 rebuilds the weight from its blocks. The memory saved is the
resident weights'; the conversions cost compute (nf4's much more). Quantization is deterministic: every server of the same files and
quantization holds the same codes (spot checks compare them with each other).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from protocol.errors import BadRequestError

QUANTS = ("none", "int8", "nf4")
NF4_BLOCK = 64
# QLoRA's NF4 code book: the quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_CODES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise BadRequestError(f"quantization {quant!r} is not one of {', '.join(QUANTS)}")
    return quant


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights, one scale per output row."""

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.codes.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (codes * scale)^T = (x @ codes^T) * scale: the weight is converted, not scaled.
        out = F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 weights in blocks of NF4_BLOCK, one scale per block."""

    packed: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().reshape(-1)
        count = weight.numel()
        padded = torch.nn.functional.pad(weight, (0, (-count) % NF4_BLOCK)).reshape(-1, NF4_BLOCK)
        scale = padded.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.tensor(NF4_CODES, device=weight.device)
        # The nearest code of each normalised weight: bucketize on the midpoints between codes.
        mids = (codes[1:] + codes[:-1]) / 2
        index = torch.bucketize((padded / scale[:, None]).reshape(-1), mids).to(torch.uint8)
        packed = (index[0::2] << 4) | index[1::2]  # two 4-bit codes per byte, high nibble first
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        pairs = F.embedding(self.packed.to(torch.int32), _byte_pairs(self.packed.device))
        blocks = pairs.reshape(-1, NF4_BLOCK) * self.scale[:, None]
        count = self.in_features * self.out_features
        return blocks.reshape(-1)[:count].reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


_PAIRS: dict[torch.device, torch.Tensor] = {}


def _byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2]: the two NF4 values of every byte (high nibble first), one table per device,
    shared by every layer: one lookup per byte unpacks two weights."""
    table = _PAIRS.get(device)
    if table is None:
        codes = torch.tensor(NF4_CODES, device=device)
        byte = torch.arange(256, device=device)
        table = _PAIRS[device] = torch.stack([codes[byte >> 4], codes[byte & 0xF]], 1)
    return table


_LAYERS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "nf4": NF4Linear}


def quantize_linears(module: nn.Module, quant: str) -> int:
    """Replace every `nn.Linear` under `module` by its quantized form (in place); returns the
    number replaced. `quant="none"` changes nothing."""
    check_quant(quant)
    if quant == "none":
        return 0
    layer = _LAYERS[quant]
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):  # subclasses too (Falcon's FalconLinear)
                setattr(parent, name, layer(child))
                count += 1
    return count


def quantized_bytes(nbytes: int, dtype: torch.dtype, quant: str) -> int:
    """An estimate of what `nbytes` of block weights in `dtype` hold once quantized (the
    linear layers' weights are nearly all of a block), for the memory check at start-up."""
    per_weight = {"none": None, "int8": 1.0 + 4.0 / 1024, "nf4": 0.5 + 4.0 / NF4_BLOCK}[quant]
    if per_weight is None:
        return nbytes
    size = torch.tensor([], dtype=dtype).element_size()
    return int(nbytes / size * per_weight)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (what its weights hold in memory)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
