"""The plain baselines every report is measured against, at the same byte budget.

Global-rank SVD truncation of every module, its balanced factors stored at fp16, or quantized to int8 /
int4 (and int3 / int2) with symmetric absmax groups of 64 values (one fp16 scale per group). If a bank does not beat these
at its own size, the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .adapter import LoraModule
from .linalg import delta_sq_error, gram_sq_norm

GROUP = 64
BITS = (16, 8, 4, 3, 2)


@dataclass
class Baseline:
    """Rank kept by global truncation within a byte budget, the bytes it uses, and its ΔW error."""

    rank: int
    bytes: int
    rel_error: float
    bits: int = 16


def quantize_levels(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization in groups of 64 consecutive values of ``t`` flattened: (integer levels in
    ``[-(2^(bits-1)-1), 2^(bits-1)-1]`` as int16, one float16 scale per group)."""
    if not 2 <= bits <= 8:  # the group scale, absmax / (2^(bits-1) - 1), is stored as fp16: at 16 bits it underflows
        raise ValueError(f"quantize takes 2 to 8 bits, not {bits}")
    flat = t.float().reshape(-1)
    pad = (-flat.numel()) % GROUP
    g = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, GROUP)
    levels = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(1, keepdim=True) / levels).half()
    q = (g / scale.float().clamp_min(1e-12)).round().clamp(-levels, levels)
    return q.reshape(-1)[: flat.numel()].to(torch.int16), scale.reshape(-1)


def dequantize(levels: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that :func:`quantize_levels` stored as ``levels`` and ``scales``."""
    n = levels.numel()
    pad = (-n) % GROUP
    g = torch.cat([levels.float(), levels.new_zeros(pad).float()]).reshape(-1, GROUP)
    return (g * scales.float().clamp_min(1e-12)[:, None]).reshape(-1)[:n].reshape(shape)


def quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric absmax quantization in groups of 64 consecutive values, dequantized (fp16 group scales)."""
    levels, scales = quantize_levels(t, bits)
    return dequantize(levels, scales, tuple(t.shape))


def truncated_factors(m: LoraModule, rank: int, bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``m``'s top ``rank`` directions as balanced factors ``B: [out, rank]``, ``A: [rank, in]``, as stored
    at ``bits`` (16: fp16; 8, 4: grouped absmax along each direction: rows of A, columns of B) and read back
    as float32."""
    bt, at, _ = m.balanced(rank)
    return stored_factors(bt, at, bits)


def stored_factors(B: torch.Tensor, A: torch.Tensor, bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``B: [out, r]``, ``A: [r, in]`` as stored at ``bits`` (16: fp16; 8, 4: grouped absmax
    along each direction) and read back as float32."""
    if bits == 16:
        return B.half().float(), A.half().float()
    return quantize(B.T, bits).T, quantize(A, bits)  # B grouped along `out`, direction by direction


def bytes_per_rank(modules: Iterable[LoraModule], bits: int = 16) -> float:
    """Bytes one unit of global rank costs: (in + out) values per module, plus group scales below 16 bits."""
    dims = sum(m.in_features + m.out_features for m in modules)
    return dims * (2 if bits == 16 else bits / 8 + 2 / GROUP)


def truncation(modules: Iterable[LoraModule], budget_bytes: int, bits: int = 16) -> Baseline:
    """Error of truncating every module to the largest global rank whose factors, stored at ``bits``
    (16: fp16; 8, 4: grouped absmax), fit in ``budget_bytes``. Errors are exact, from the factors."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")
    modules = list(modules)
    per_rank = bytes_per_rank(modules, bits)
    max_rank = max((m.r for m in modules), default=0)
    rank = min(int(budget_bytes // per_rank) if per_rank else 0, max_rank)
    err = ref = 0.0
    for m in modules:
        b, a = m.folded()
        norm = float(gram_sq_norm(b.double(), a.double()))
        ref += norm
        if rank == 0:
            err += norm
            continue
        err += delta_sq_error(b, a, *truncated_factors(m, rank, bits))
    return Baseline(rank=rank, bytes=math.ceil(rank * per_rank), rel_error=math.sqrt(err / ref) if ref > 0 else 0.0, bits=bits)
