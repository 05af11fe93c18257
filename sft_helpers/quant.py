"""NF4 quantization as QLoRA does it, in plain torch, byte for byte what bitsandbytes stores.

A 4-bit QLoRA weight is three things:
- `codes`: one 4-bit index per weight into a table of 16 levels in [-1, 1]. For NF4 the
  levels are quantiles of a standard normal (`nf4_code`), because trained weights are
  close to normal: each level then gets about the same share of the weights.
- `absmax`: one float per block of `blocksize` (64) consecutive weights, the block's largest
  magnitude. A weight is stored as the level nearest to `w / absmax` and read back as
  `level * absmax`. That is 32 bits per 64 weights: 0.5 extra bits per parameter.
- double quantization (`double_quantize`): the absmax values themselves stored in 8 bits,
  in blocks of 256, after subtracting their mean; that brings the constants to ~0.127 bits
  per parameter.

Two 4-bit codes share a byte (`pack_4bit`): the first in the high nibble.

    >>> codes, absmax = quantize_nf4(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    >>> codes.tolist(), absmax.tolist()
    ([10, 0, 7, 12], [2.0])
    >>> [round(v, 3) for v in dequantize_nf4(codes, absmax, (4,)).tolist()]
    [0.492, -2.0, 0.0, 0.881]
"""

from __future__ import annotations

import math

import torch

# The outermost normal quantile of NF4: halfway between the quantiles 1 - 1/(2*15) and
# 1 - 1/(2*16), so that the extreme levels are not the (infinite) 0 and 1 quantiles.
# bitsandbytes uses it rounded to 7 digits; we use the same digits so the tables agree.
NF4_OFFSET = 0.9677083
# NF4 is asymmetric: 8 positive levels, 7 negative ones and an exact zero.
NF4_POSITIVE, NF4_NEGATIVE = 8, 7
BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# bitsandbytes clamps a block's absmax from below so that an all-zero block divides by a
# tiny number instead of zero (and quantizes to the zero level instead of NaN).
MIN_ABSMAX = 1e-38
# bitsandbytes' FP4: 1 sign, 2 exponent and 1 mantissa bit; magnitudes before scaling to 1.
FP4_MAGNITUDES = (0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
# Exponent bits of the signed 8-bit dynamic map that stores the double-quantized absmax.
DYNAMIC_EXPONENT_BITS = 7


def nf4_code() -> torch.Tensor:
    """The 16 NormalFloat4 levels, sorted, from -1.0 to 1.0, with an exact 0.0 at index 7.

    Positive levels are the normal quantiles of 8 evenly spaced probabilities from
    `NF4_OFFSET` down to 0.5 (exclusive), negative ones the same with 7; then all are
    divided by the largest. The probabilities are computed in float32 and the quantiles in
    float64, as bitsandbytes does, so the table equals its NF4 table exactly.

    >>> [round(v, 4) for v in nf4_code()[6:9].tolist()]
    [-0.0911, 0.0, 0.0796]
    """
    positive = torch.linspace(NF4_OFFSET, 0.5, NF4_POSITIVE + 1)[:-1]
    negative = torch.linspace(NF4_OFFSET, 0.5, NF4_NEGATIVE + 1)[:-1]
    levels = torch.cat(
        [
            torch.special.ndtri(positive.double()),
            torch.zeros(1, dtype=torch.float64),
            -torch.special.ndtri(negative.double()),
        ]
    )
    levels = levels.float().sort().values
    return levels / levels.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' 16 FP4 levels (1 sign, 2 exponent, 1 mantissa bit), sorted, in [-1, 1].

    Zero appears twice (+0 and -0), so FP4 has only 15 distinct levels.

    >>> fp4_code()[-3:].tolist()
    [0.5, 0.6666666865348816, 1.0]
    """
    magnitudes = torch.tensor(FP4_MAGNITUDES) / max(FP4_MAGNITUDES)
    return torch.cat([-magnitudes, magnitudes]).sort().values


def int_code(bits: int) -> torch.Tensor:
    """The symmetric absmax integer levels k / (2**(bits-1) - 1), k = -(2**(bits-1) - 1) ...

    >>> int_code(4)[:3].tolist()
    [-1.0, -0.8571428656578064, -0.7142857313156128]
    """
    top = 2 ** (bits - 1) - 1
    return torch.arange(-top, top + 1, dtype=torch.float32) / top


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map bitsandbytes uses for double quantization (256 levels).

    A dynamic exponent (10**-6 ... 10**0) times a linear fraction whose resolution grows as
    the exponent grows: fine steps near zero, coarse ones near 1, plus 0 and 1 themselves.

    >>> code = dynamic_code(); code.numel(), code[0].item() < 0, code[-1].item()
    (256, True, 1.0)
    """
    values = [torch.zeros(1), torch.ones(1)]
    for i in range(DYNAMIC_EXPONENT_BITS):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (-(DYNAMIC_EXPONENT_BITS - 1) + i)
        values += [scale * means, -scale * means]
    return torch.cat(values).sort().values


NF4_CODE = nf4_code()


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 1 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a positive power of two, got {blocksize!r}")


def _check_weights(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        kind = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"can only quantize a floating-point tensor, got {kind}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor (it has no blocks)")
    if not torch.isfinite(w).all():
        bad = torch.nonzero(~torch.isfinite(w.flatten()))[0].item()
        raise ValueError(f"cannot quantize non-finite values (first at flat index {bad})")


def quantize_blockwise(
    w: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of `w.flatten()` to the nearest level of sorted `code`.

    Returns `(codes, absmax)`: uint8 indices into `code`, one per element, and one float32
    absmax per block (the last block may be shorter). Full blocks are scaled by the
    reciprocal of their absmax and a short last block is divided by it, as bitsandbytes'
    CPU kernel does, so the indices agree bit for bit.

    >>> quantize_blockwise(torch.tensor([1.0, -0.2, 0.6]), int_code(4), blocksize=2)[0].tolist()
    [14, 6, 14]
    """
    _check_blocksize(blocksize)
    _check_weights(w)
    flat = w.detach().flatten().float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = [(blocks * (1.0 / absmax.clamp(min=MIN_ABSMAX)[:, None])).flatten()]
    if full < n:
        last = flat[full:].abs().max()
        absmax = torch.cat([absmax, last[None]])
        scaled.append(flat[full:] / last.clamp(min=MIN_ABSMAX))
    scaled = torch.cat(scaled).clamp(-1, 1)
    # The nearest level: the first midpoint at or above the value (ties go to the lower level).
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE
) -> torch.Tensor:
    """The float32 values `code[codes] * absmax` (per block), flat, of length `codes.numel()`.

    >>> dequantize_blockwise(torch.tensor([14, 6, 14]), torch.tensor([1.0, 0.6]),
    ...                      int_code(4), blocksize=2).tolist()
    [1.0, -0.1428571492433548, 0.6000000238418579]
    """
    _check_blocksize(blocksize)
    n = codes.numel()
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"{n} codes in blocks of {blocksize} need {blocks} absmax values, "
            f"got {absmax.numel()}"
        )
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return code[codes.flatten().long()] * scale


def quantize_nf4(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 `(codes, absmax)` of `w`: uint8 codes 0..15 of `w.flatten()`, float32 absmax per block.

    >>> codes, absmax = quantize_nf4(torch.randn(130))
    >>> codes.shape, absmax.shape, codes.dtype
    (torch.Size([130]), torch.Size([3]), torch.uint8)
    """
    return quantize_blockwise(w, NF4_CODE, blocksize)


def dequantize_nf4(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = BLOCKSIZE,
) -> torch.Tensor:
    """The float32 tensor of `shape` that NF4 `(codes, absmax)` stand for.

    >>> w = torch.randn(3, 5)
    >>> dequantize_nf4(*quantize_nf4(w), w.shape).shape
    torch.Size([3, 5])
    """
    if math.prod(shape) != codes.numel():
        raise ValueError(f"{codes.numel()} codes cannot fill shape {tuple(shape)}")
    return dequantize_blockwise(codes, absmax, NF4_CODE, blocksize).view(shape)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble; shape `(ceil(n / 2), 1)`.

    An odd count is padded with code 7, NF4's zero (bitsandbytes pads the scaled values
    with 0.0, which quantizes to that level).

    >>> pack_4bit(torch.tensor([1, 2, 15], dtype=torch.uint8)).flatten().tolist()
    [18, 247]
    """
    if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) > 15):
        raise ValueError("pack_4bit needs uint8 codes in 0..15")
    flat = codes.flatten()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_tensor([int(NF4_CODE.abs().argmin())])])
    return ((flat[0::2] << 4) | flat[1::2]).view(-1, 1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` 4-bit codes of `packed` (the inverse of `pack_4bit`).

    >>> unpack_4bit(torch.tensor([18, 247], dtype=torch.uint8), 3).tolist()
    [1, 2, 15]
    """
    flat = packed.flatten()
    if flat.dtype != torch.uint8 or not 0 <= n <= 2 * flat.numel():
        raise ValueError(f"cannot unpack {n} codes from {flat.numel()} {flat.dtype} bytes")
    return torch.stack([flat >> 4, flat & 0xF], dim=1).flatten()[:n]


def double_quantize(
    absmax: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Store the NF4 absmax values in 8 bits: `(codes, absmax2, offset)`.

    As bitsandbytes does with `compress_statistics=True`: subtract the mean (`offset`, one
    float32) so the values straddle zero, then quantize blockwise (blocks of 256) to the
    signed 8-bit `dynamic_code`, with one float32 `absmax2` per block.

    The 8-bit codes are the nearest levels. bitsandbytes' CPU kernel searches the 256 levels
    approximately: at near-ties (well under 1% of the codes) it stores a neighbouring level,
    less than 1e-4 of the block scale worse. Another harmless difference: a block whose
    values all equal the mean (a tensor of a single NF4 block) has `absmax2 == 0`;
    bitsandbytes' CPU kernel then writes code 0, we write the zero level (127). Both read
    back as `offset`.

    >>> codes, absmax2, offset = double_quantize(torch.rand(1000))
    >>> codes.dtype, absmax2.shape, offset.shape
    (torch.uint8, torch.Size([4]), torch.Size([]))
    """
    offset = absmax.float().mean()
    codes, absmax2 = quantize_blockwise(absmax.float() - offset, dynamic_code(), blocksize)
    return codes, absmax2, offset


def double_dequantize(
    codes: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int = DOUBLE_QUANT_BLOCKSIZE,
) -> torch.Tensor:
    """The absmax values that `double_quantize` stored (float32, approximately).

    >>> absmax = torch.rand(300) + 0.5
    >>> bool((double_dequantize(*double_quantize(absmax)) - absmax).abs().max() < 0.01)
    True
    """
    return dequantize_blockwise(codes, absmax2, dynamic_code(), blocksize) + offset


def constants_bits_per_parameter(
    n: int, blocksize: int = BLOCKSIZE, double_quant: bool = True
) -> float:
    """Bits of quantization constants per weight, counted from the tensors a 4-bit load keeps.

    Without double quantization: one float32 absmax per block. With it: one uint8 code per
    block, one float32 absmax2 per 256 blocks, one float32 offset.

    >>> round(constants_bits_per_parameter(4096 * 4096, double_quant=False), 3)
    0.5
    >>> round(constants_bits_per_parameter(4096 * 4096), 3)
    0.127
    """
    blocks = -(-n // blocksize)
    if not double_quant:
        return 32 * blocks / n
    blocks2 = -(-blocks // DOUBLE_QUANT_BLOCKSIZE)
    return (8 * blocks + 32 * blocks2 + 32) / n
