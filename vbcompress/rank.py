"""Rank rules: how many singular directions of a module to keep.

- ``sara``: smallest k with Σ_{i≤k} σ_i ≥ X · Σ σ_i (SARA, arXiv 2408.03290; sum of σ, not σ²).
- ``fro``: smallest k with Σ_{i≤k} σ_i² ≥ X² · Σ σ_i² (X is the fraction of ‖ΔW‖_F kept).
- ``ratio``: keep σ_i > σ_max / X (kohya's ``sv_ratio``).
"""

from __future__ import annotations

import torch

from .settings import RANK_RULES as RULES


def choose_rank(s: torch.Tensor, rule: str = "sara", threshold: float = 0.9) -> int:
    """Rank chosen by ``rule`` for singular values ``s`` (descending); 0 for an all-zero spectrum."""
    s = s.double().clamp_min(0)
    if rule not in RULES:
        raise ValueError(f"unknown rank rule {rule!r} (choose from {', '.join(RULES)})")
    if s.numel() == 0 or s[0] == 0:
        return 0
    if rule == "ratio":
        if threshold < 1:
            raise ValueError(f"ratio rule needs a threshold ≥ 1, got {threshold}")
        return int((s > s[0] / threshold).sum())
    if not 0 < threshold <= 1:
        raise ValueError(f"{rule} rule needs a threshold in (0, 1], got {threshold}")
    values, target = (s, threshold) if rule == "sara" else (s.square(), threshold**2)
    cum = values.cumsum(0)
    # The relative slack keeps threshold = 1 at the full numerical rank despite rounding in the sums.
    return int((cum < target * cum[-1] * (1 - 1e-12)).sum()) + 1


def retained(s: torch.Tensor, k: int) -> tuple[float, float]:
    """(share of ‖ΔW‖_F kept, share of Σσ kept) when keeping the top ``k`` directions."""
    s = s.double()
    fro = float(s[:k].square().sum().sqrt() / s.square().sum().sqrt()) if s.sum() > 0 else 1.0
    nuc = float(s[:k].sum() / s.sum()) if s.sum() > 0 else 1.0
    return fro, nuc
