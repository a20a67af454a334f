"""``eval``: how far a candidate adapter is from a reference, in weights and, with a base model, in effect."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .basemodel import Base, read_texts
from .errors import SettingError
from .formats import load_adapter
from .hub import resolve
from .metrics import DeltaReport, SizeReport, delta_errors, size_report
from .retention import Probe, Retention
from .settings import Progress
from .verdict import Verdict, best_plain, judge


@dataclass
class EvalReport:
    """ΔW errors and sizes of ``cand`` against ``ref``; ``function`` with a base model and data."""

    ref: str
    cand: str
    delta: DeltaReport
    sizes: SizeReport
    function: Retention | None = None
    verdict: Verdict | None = None

    def to_json(self) -> dict:
        out = {"ref": self.ref, "cand": self.cand, "delta": self.delta.to_dict(), "sizes": asdict(self.sizes)}
        if self.function is not None:
            out["function"] = asdict(self.function)
        out["verdict"] = self.verdict.to_json() if self.verdict else None
        return out


def evaluate(
    ref: str | Path,
    cand: str | Path,
    base: str | Path | None = None,
    data: str | Path | None = None,
    max_length: int = 128,
    *,
    token: str | None = None,
    progress: Progress | None = None,
) -> EvalReport:
    """ΔW errors (per module and total) and sizes of ``cand`` against ``ref``; both any readable format,
    local or Hub ids.

    With ``base`` and ``data`` (text file), also the effect retention and mean cosine of base+cand's
    outputs against base+ref's on those inputs.
    """
    if (base is None) != (data is None):
        raise SettingError("base" if base is None else "data", "effect retention needs both a base model and data ({setting} is missing)")
    reference = load_adapter(resolve(ref, "adapter", token=token).path)
    candidate = load_adapter(resolve(cand, "adapter", token=token).path)
    report = EvalReport(ref=str(ref), cand=str(cand), delta=delta_errors(reference, candidate), sizes=size_report(reference, candidate))
    plain = best_plain(reference.modules.values(), report.sizes.cand_bytes)
    if base is not None:
        model = Base(resolve(base, "base", token=token).path, reference)
        model.check(candidate)
        texts = read_texts(data)
        model.check_length(texts, data, max_length)
        probe = Probe(model, texts, reference.delta_weights(), max_length, progress=progress)
        report.function = probe.measure(candidate.delta_weights())
        if plain is not None:
            plain.retention = probe.measure(plain.deltas(reference.modules)).headline
    kept = report.function.headline if report.function is not None else None
    report.verdict = judge("CAND", reference.modules.values(), report.sizes.cand_bytes, report.delta.total_rel_error, kept, plain, str(ref))
    return report
