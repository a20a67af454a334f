"""Sizes and representations in words, for people (kept free of torch, so the command line starts fast)."""

from __future__ import annotations


def fmt_bytes(n: int | None) -> str:
    """Bytes for people: ``512 B``, ``19.84 KB``, ``1.62 MB`` (decimal units, as the reports use)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def held_name(codec: str, rank: int, bits: int | None, per_module: bool = False, vectors: int = 0) -> str:
    """How an adapter is held: ``bank codes r=2``, ``bank codes r=1 + 32 vectors`` (a grown bank), ``int4
    factors r=1``, ``fp16 factors r=8``, or with ranks chosen per module ``int4 factors r≤6``."""
    if codec == "bank":
        return f"bank codes r={rank}" + (f" + {vectors} vectors" if vectors else "")
    return f"{'fp16' if bits == 16 else f'int{bits}'} factors r{'≤' if per_module else '='}{rank}"
