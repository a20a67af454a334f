"""Low-rank algebra without dense ΔW: balanced gauge, spectra and errors from r×r matrices.

For ``ΔW = B @ A`` with ``B: [out, r]``, ``A: [r, in]``: QR of ``B`` and ``Aᵀ`` leaves an ``r×r`` core
whose SVD is the SVD of ΔW, at ``O((in + out)·r²)`` cost.
"""

from __future__ import annotations

import torch


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``B @ A`` as ``(U [out, r], S [r], Vh [r, in])`` in float64, from QR and an r×r SVD."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def singular_values(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of ``B @ A`` (descending, float64)."""
    rb = torch.linalg.qr(B.double(), mode="r")[1]
    ra = torch.linalg.qr(A.double().T, mode="r")[1]
    return torch.linalg.svdvals(rb @ ra.T)


def balanced(B: torch.Tensor, A: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced factors ``B' = U √S``, ``A' = √S Vh`` (float32) with ``B' @ A' = B @ A``, and ``S``.

    Rows of ``A'`` and columns of ``B'`` are orthogonal with equal norms ``√σ_i``; ``rank`` keeps the
    top directions only.
    """
    u, s, vh = low_rank_svd(B, A)
    if rank is not None:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return (u * root).float(), (root[:, None] * vh).float(), s


def gram_sq_error(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """``‖B1 A1 − B2 A2‖²_F`` from r×r Gram matrices; differentiable, no dense product."""
    return ((B1.T @ B1) * (A1 @ A1.T)).sum() - 2 * ((B1.T @ B2) * (A1 @ A2.T)).sum() + ((B2.T @ B2) * (A2 @ A2.T)).sum()


def gram_sq_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``‖B A‖²_F`` from Gram matrices."""
    return ((B.T @ B) * (A @ A.T)).sum()


def delta_sq_error(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``‖B1 A1 − B2 A2‖²_F`` in float64, exact to rounding (clamped at 0).

    Gram expansion cancels badly when the two products are nearly equal, so the difference is
    written as one low-rank product ``[B1, −B2] @ [A1; A2]`` and its Gram norm taken.
    """
    bb = torch.cat([B1.double(), -B2.double()], dim=1)
    aa = torch.cat([A1.double(), A2.double()], dim=0)
    rb = torch.linalg.qr(bb, mode="r")[1]
    ra = torch.linalg.qr(aa.T, mode="r")[1]
    return float((rb @ ra.T).square().sum())
