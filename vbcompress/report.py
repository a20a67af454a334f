"""``inspect``: what an adapter holds, module by module, without forming dense ΔW."""

from __future__ import annotations

from pathlib import Path

import torch

from .formats import load_adapter
from .linalg import singular_values
from .rank import choose_rank


def inspect_adapter(path: str | Path, threshold: float = 0.9, format: str | None = None) -> dict:
    """A JSON-ready summary of the adapter at ``path``.

    Per module: shape, rank, scale, ‖ΔW‖_F, largest σ, effective rank by the SARA rule at ``threshold``,
    share of ‖ΔW‖²_F in the top direction, and whether it is all zero or holds NaN/Inf.
    Non-finite adapters are reported, not refused.
    """
    adapter = load_adapter(path, format=format, allow_nonfinite=True)
    modules = []
    for name, m in adapter.modules.items():
        finite = bool(torch.isfinite(m.A).all() and torch.isfinite(m.B).all())
        row = {
            "name": name,
            "kind": m.kind,
            "out": m.out_features,
            "in": m.in_features,
            "r": m.r,
            "scale": m.scale,
            "fan_in_fan_out": m.fan_in_fan_out,
            "params": m.num_params,
            "nonfinite": not finite,
            "zero": False,
            "norm": None,
            "sigma_max": None,
            "effective_rank": None,
            "top_energy": None,
        }
        if finite:
            b, a = m.folded()
            s = singular_values(b, a)
            energy = float(s.square().sum())
            row.update(
                zero=energy == 0.0,
                norm=energy**0.5,
                sigma_max=float(s[0]) if s.numel() else 0.0,
                effective_rank=choose_rank(s, "sara", threshold),
                top_energy=float(s[0] ** 2 / energy) if energy > 0 else None,
            )
        modules.append(row)
    vb = adapter.vector_bank
    return {
        "path": str(path),
        "file": adapter.source,
        "format": adapter.source_format,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "dtype": adapter.dtype,
        "num_modules": len(modules),
        "ranks": adapter.ranks,
        "lora_params": adapter.num_lora_params,
        "stored_bytes": adapter.stored_bytes(),
        "fp16_bytes": adapter.fp16_bytes(),
        "carried_params": adapter.num_carried_params,
        "carried_bytes": adapter.carried_bytes(),
        "carried_keys": sorted(adapter.carried),
        "vector_bank": None
        if vb is None
        else {"num_vectors": vb.num_vectors, "vector_length": vb.vector_length, "topk": vb.topk},
        "threshold": threshold,
        "zero_modules": [r["name"] for r in modules if r["zero"]],
        "nonfinite_modules": [r["name"] for r in modules if r["nonfinite"]],
        "modules": modules,
    }
