"""``eval``: how far a candidate adapter is from a reference."""

from __future__ import annotations

from pathlib import Path

from .errors import VBCompressError
from .formats import load_adapter
from .metrics import delta_errors, size_report


def evaluate(ref: str | Path, cand: str | Path, base: str | Path | None = None, data: str | Path | None = None, max_length: int = 128) -> dict:
    """ΔW errors (per module and total) and sizes of ``cand`` against ``ref``; both any readable format.

    With ``base`` and ``data`` (text file), also the effect retention and mean cosine of base+cand's
    outputs against base+ref's on those inputs.
    """
    reference, candidate = load_adapter(ref), load_adapter(cand)
    result = {"ref": str(ref), "cand": str(cand), "delta": delta_errors(reference, candidate).to_dict(), "sizes": size_report(reference, candidate)}
    if (base is None) != (data is None):
        raise VBCompressError(None, "effect retention needs both --base and --data")
    if base is not None:
        from .bank.calibrate import Base, read_texts, retention

        model = Base(base, reference)
        model.check(candidate)
        ref_d = {n: m.delta_weight() for n, m in reference.modules.items()}
        cand_d = {n: m.delta_weight() for n, m in candidate.modules.items()}
        result["function"] = retention(model, read_texts(data), ref_d, cand_d, max_length)
    return result
