"""``eval``: how far a candidate adapter is from a reference."""

from __future__ import annotations

from pathlib import Path

from .formats import load_adapter
from .metrics import delta_errors, size_report


def evaluate(ref: str | Path, cand: str | Path) -> dict:
    """ΔW errors (per module and total) and sizes of ``cand`` against ``ref``; both any readable format."""
    reference, candidate = load_adapter(ref), load_adapter(cand)
    return {"ref": str(ref), "cand": str(cand), "delta": delta_errors(reference, candidate).to_dict(), "sizes": size_report(reference, candidate)}
