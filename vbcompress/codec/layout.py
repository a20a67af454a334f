"""The VB-LoRA code layout, in one place: how A and B are tiled into sub-vectors, how a top-k code is
stored (indices, k−1 weights) and how it decodes, exactly as PEFT computes it.

A module of rank r with ``A: [r, in]`` and ``B: [out, r]`` is ``r·in/L`` sub-vectors of A (the **in**
dimension tiled, row by row) followed by ``out/L·r`` sub-vectors of B (the **out** dimension tiled, chunk
by chunk). Each sub-vector is ``Σ_k w_k · bank[i_k]``.

PEFT restores a compact module's logits as ``log(w)`` at the stored indices (the last weight being
``1 − Σ others``) and ``−inf`` elsewhere; :func:`restored_weights` repeats that arithmetic exactly so that
our reconstruction equals what PEFT computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Smallest mixture weight we write: PEFT takes log(1 - Σ stored), which must stay finite in float32.
MIN_WEIGHT = 1e-6


@dataclass
class VBCode:
    """Top-k code of one VB-LoRA module: indices into the bank and mixture weights (rows sum to 1).

    ``indices_A, weights_A: [r, in/L, k]``; ``indices_B, weights_B: [out/L, r, k]``.
    """

    indices_A: torch.Tensor
    weights_A: torch.Tensor
    indices_B: torch.Tensor
    weights_B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.indices_A.shape[0]

    @property
    def subvectors(self) -> int:
        return self.indices_A[..., 0].numel() + self.indices_B[..., 0].numel()


@dataclass
class VectorBank:
    """One bank ``[N, L]`` shared by every module, with each module's top-k code."""

    bank: torch.Tensor
    topk: int
    codes: dict[str, VBCode] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return self.bank.shape[0]

    @property
    def vector_length(self) -> int:
        return self.bank.shape[1]

    def decode(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` of one module, as PEFT computes them."""
        return decode(self.bank, self.codes[name])


def mix(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sub-vectors ``Σ_k weights[..., k] · bank[indices[..., k]]``: ``[..., k]`` codes → ``[..., L]``."""
    return torch.einsum("...k,...kl->...l", weights.float(), bank.float()[indices.long()])


def decode(bank: torch.Tensor, code: VBCode) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` of ``code`` on ``bank``."""
    a = mix(bank, code.indices_A, code.weights_A)  # [r, in/L, L]
    b = mix(bank, code.indices_B, code.weights_B)  # [out/L, r, L]
    return a.reshape(a.shape[0], -1), untile_B(b)


def tile_A(a: torch.Tensor, length: int) -> torch.Tensor:
    """``A: [r, in]`` → sub-vectors ``[r·in/L, L]`` (row by row)."""
    return a.reshape(-1, length)


def tile_B(b: torch.Tensor, length: int) -> torch.Tensor:
    """``B: [out, r]`` → sub-vectors ``[out/L·r, L]`` (PEFT's order: out-chunk by out-chunk, then rank)."""
    rank = b.shape[1]
    return b.reshape(-1, length, rank).transpose(1, 2).reshape(-1, length)


def untile_B(sub: torch.Tensor) -> torch.Tensor:
    """Sub-vectors ``[out/L, r, L]`` → ``B: [out, r]`` (the inverse of :func:`tile_B`)."""
    return sub.transpose(1, 2).reshape(-1, sub.shape[1])


def code_of(indices: torch.Tensor, weights: torch.Tensor, rank: int, in_features: int, out_features: int, length: int) -> VBCode:
    """A module's :class:`VBCode` from its rows ``[S_m, k]`` of a sub-vector table (A's rows, then B's)."""
    k, na = indices.shape[-1], rank * in_features // length
    return VBCode(
        indices_A=indices[:na].reshape(rank, -1, k),
        weights_A=weights[:na].reshape(rank, -1, k),
        indices_B=indices[na:].reshape(-1, rank, k),
        weights_B=weights[na:].reshape(-1, rank, k),
    )


def module_subvectors(rank: int, in_features: int, out_features: int, length: int) -> int:
    """Sub-vectors of one module: ``r·in/L + out/L·r``."""
    return rank * (in_features // length + out_features // length)


def index_dtype(num_vectors: int) -> torch.dtype:
    """The index dtype PEFT uses for a bank of ``num_vectors`` vectors (int16 from N = 256 on)."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


def stored_index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type for indices below ``num_vectors``, as a collection stores them (PEFT's
    own layout moves to int16 one vector earlier, at N = 256; unpack writes PEFT's)."""
    return torch.uint8 if num_vectors <= 256 else torch.int16 if num_vectors <= 2**15 else torch.int32


def vb_stored_bytes(vb: VectorBank) -> int:
    """Bytes of bank + indices + float32 top-k weights (k-1 stored per sub-vector), as the compact layout writes."""
    idx_size = torch.empty(0, dtype=index_dtype(vb.num_vectors)).element_size()
    subvectors = sum(c.subvectors for c in vb.codes.values())
    return vb.bank.numel() * vb.bank.element_size() + subvectors * (vb.topk * idx_size + (vb.topk - 1) * 4)


def restored_weights(stored: torch.Tensor) -> torch.Tensor:
    """Full top-k weights from the ``k-1`` stored ones, computed as PEFT does on load."""
    stored = stored.float()
    full = torch.cat([stored, 1 - stored.sum(-1, keepdim=True)], dim=-1)
    return torch.softmax(torch.log(full), dim=-1)


def compact_weights(weights: torch.Tensor, indices: torch.Tensor, descending: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort a code by weight, keep weights ≥ MIN_WEIGHT, return (indices, stored k-1 weights); the last weight is
    restored as 1 − Σ the stored ones, so ascending (the largest restored) keeps small weights exact."""
    k = weights.shape[-1]
    w = weights.double().clamp_min(0)
    w = w / w.sum(-1, keepdim=True)
    # floored, not shifted: a code that already reads back from this layout is written again unchanged
    w = w.clamp_min(MIN_WEIGHT)
    w = w / w.sum(-1, keepdim=True)
    w, order = w.sort(dim=-1, descending=descending)
    return indices.gather(-1, order), w[..., : k - 1].float().contiguous()


def canonical_code(code: VBCode) -> VBCode:
    """The code exactly as it reads back from the compact layout (weights rounded the way PEFT restores them)."""
    ia, wa = compact_weights(code.weights_A, code.indices_A, descending=False)
    ib, wb = compact_weights(code.weights_B, code.indices_B, descending=False)
    return VBCode(ia, restored_weights(wa), ib, restored_weights(wb))


def half_stored(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted indices, k−1 float16 weights) as a collection stores a code: compact, with the weights
    rounded toward zero so that a row never sums past 1. The smallest weights are stored and the largest
    restored as 1 − Σ them: float16 near 1 is coarse (2⁻¹¹), and the rounding would otherwise hand up to 5e-4
    to a vector meant to have 1e-6, which matters where that vector is large (a bank grown with small vectors)."""
    sorted_idx, stored = compact_weights(weights, indices, descending=False)
    half = stored.half()
    half = torch.where(half.float() > stored, torch.nextafter(half, torch.zeros_like(half)), half)
    return sorted_idx, half
