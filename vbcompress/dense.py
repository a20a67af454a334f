"""``vb2lora`` / ``resize``: any readable adapter → dense PEFT LoRA, at a fixed or per-module adaptive rank.

Each module's ΔW is factored by SVD from its low-rank factors (QR + r×r SVD; a VB-LoRA module is
decoded from its bank first), truncated, and written balanced (``B = U√S``, ``A = √S Vh``) with scale 1:
``lora_alpha = r`` per module, ranks in ``rank_pattern`` / ``alpha_pattern`` so PEFT rebuilds each module.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from .adapter import Adapter
from .errors import VBCompressError
from .files import atomic_output_dir, write_json
from .formats import load_adapter, write_peft_lora
from .linalg import low_rank_svd
from .rank import RULES, choose_rank, retained

REPORT_FILE = "vbcompress.json"
DTYPES = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def truncate(adapter: Adapter, rank: int | str | None = None, rule: str = "sara", threshold: float = 0.9) -> tuple[Adapter, list[dict]]:
    """A LoRA copy of ``adapter`` truncated per module, and per-module rows (rank, retained shares).

    ``rank``: an int (same cap for every module), ``"auto"`` (chosen by ``rule`` at ``threshold``), or
    None (each module's own rank: reproduces ΔW).
    """
    if rank not in (None, "auto") and (not isinstance(rank, int) or rank < 1):
        raise VBCompressError(None, f"--rank must be a positive integer or 'auto', not {rank!r}")
    if rule not in RULES:
        raise VBCompressError(None, f"--rule must be one of {', '.join(RULES)}, not {rule!r}")
    modules, rows = {}, []
    for name, m in adapter.modules.items():
        b, a = m.folded()
        u, s, vh = low_rank_svd(b, a)
        if rank == "auto":
            try:
                k = choose_rank(s, rule, threshold)
            except ValueError as e:
                raise VBCompressError(None, str(e)) from None
        else:
            # As PEFT's convert_to_lora: a fixed rank is kept even where trailing σ are ~0.
            k = s.numel() if rank is None else min(rank, s.numel())
        fro, nuc = retained(s, k)
        keep = max(k, 1)  # PEFT needs r ≥ 1: an all-zero module becomes rank 1 with zero factors
        root = s[:keep].sqrt()
        dtype = m.A.dtype if m.A.is_floating_point() and adapter.vector_bank is None else torch.float32
        modules[name] = replace(
            m,
            A=(root[:, None] * vh[:keep]).to(dtype),
            B=(u[:, :keep] * root).to(dtype),
            scale=1.0,
            alpha=None,
        )
        rows.append({"name": name, "source_rank": m.r, "rank": k, "retained_fro": fro, "retained_sigma": nuc,
                     "energy": float(s.square().sum()), "kept_energy": float(s[:k].square().sum())})  # fmt: skip
    out = replace(adapter, modules=modules, vector_bank=None, source_format="peft" if adapter.source_format == "vblora" else adapter.source_format)
    return out, rows


def to_lora(
    src: str | Path,
    out: str | Path,
    *,
    rank: int | str | None = None,
    rule: str = "sara",
    threshold: float = 0.9,
    dtype: str = "keep",
    format: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert the adapter at ``src`` to a dense PEFT LoRA in ``out``; returns (and writes) the report."""
    if dtype not in DTYPES:
        raise VBCompressError(None, f"--dtype must be one of {', '.join(DTYPES)}")
    source = load_adapter(src, format=format)
    lora, rows = truncate(source, rank, rule, threshold)
    total = sum(r["energy"] for r in rows)
    kept = sum(r["kept_energy"] for r in rows)
    report = {
        "source": str(src),
        "source_format": source.source_format,
        "rank": rank,
        "rule": rule if rank == "auto" else None,
        "threshold": threshold if rank == "auto" else None,
        "modules": rows,
        "retained_fro": math.sqrt(kept / total) if total > 0 else 1.0,
        "rel_error": math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0,
        "bytes_before": source.stored_bytes(),
    }
    with atomic_output_dir(out, overwrite=overwrite, inputs=(src,)) as tmp:
        write_peft_lora(lora, tmp, dtype=DTYPES[dtype])
        report["bytes_after"] = load_adapter(tmp).stored_bytes()
        write_json(tmp / REPORT_FILE, report)
    return report
