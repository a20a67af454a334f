"""How far one adapter is from another: ΔW errors per module and in total, and sizes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .adapter import Adapter, natural_key
from .errors import ShapeError
from .linalg import delta_sq_error, gram_sq_norm


@dataclass
class ModuleFit:
    """ΔW error of one module against the source: ``‖ΔW' − ΔW‖_F`` absolute and relative to ``‖ΔW‖_F``."""

    rel_error: float | None
    abs_error: float
    ref_norm: float


@dataclass
class ModuleError:
    name: str
    ref_norm: float
    abs_error: float
    rel_error: float | None  # None where the reference ΔW is zero


@dataclass
class DeltaReport:
    """ΔW error of a candidate against a reference: ``‖ΔW' − ΔW‖_F / ‖ΔW‖_F`` summed over modules."""

    total_rel_error: float | None
    modules: list[ModuleError]
    missing: list[str] = field(default_factory=list)  # in the reference, not in the candidate
    extra: list[str] = field(default_factory=list)  # in the candidate only

    def to_dict(self) -> dict:
        return asdict(self)


def delta_errors(ref: Adapter, cand: Adapter) -> DeltaReport:
    """Per-module and total ΔW error of ``cand`` against ``ref``, from low-rank factors only."""
    rows, err_sq, ref_sq = [], 0.0, 0.0
    names = sorted(set(ref.modules) | set(cand.modules), key=natural_key)
    for name in names:
        r, c = ref.modules.get(name), cand.modules.get(name)
        rb, ra = r.folded() if r else (None, None)
        cb, ca = c.folded() if c else (None, None)
        if r and c and (r.out_features, r.in_features) != (c.out_features, c.in_features):
            raise ShapeError(
                cand.source,
                f"module {name}: ΔW is {c.out_features}×{c.in_features} here but {r.out_features}×{r.in_features} in {ref.source}",
            )
        norm_sq = float(gram_sq_norm(rb.double(), ra.double())) if r else 0.0
        if r and c:
            e_sq = delta_sq_error(rb, ra, cb, ca)
        else:
            e_sq = norm_sq if r else float(gram_sq_norm(cb.double(), ca.double()))
        err_sq += e_sq
        ref_sq += norm_sq
        rows.append(ModuleError(name, math.sqrt(norm_sq), math.sqrt(e_sq), math.sqrt(e_sq / norm_sq) if norm_sq > 0 else None))
    return DeltaReport(
        total_rel_error=math.sqrt(err_sq / ref_sq) if ref_sq > 0 else None,
        modules=rows,
        missing=sorted(set(ref.modules) - set(cand.modules)),
        extra=sorted(set(cand.modules) - set(ref.modules)),
    )


@dataclass
class SizeReport:
    """Bytes of both adapters' own weights, the reference at fp16, and the ratio used everywhere."""

    ref_bytes: int
    ref_fp16_bytes: int
    cand_bytes: int
    ratio_vs_ref_fp16: float | None
    ref_carried_bytes: int
    cand_carried_bytes: int


def size_report(ref: Adapter, cand: Adapter) -> SizeReport:
    """Sizes of ``cand`` against ``ref``."""
    fp16 = ref.fp16_bytes()
    return SizeReport(
        ref_bytes=ref.stored_bytes(),
        ref_fp16_bytes=fp16,
        cand_bytes=cand.stored_bytes(),
        ratio_vs_ref_fp16=cand.stored_bytes() / fp16 if fp16 else None,
        ref_carried_bytes=ref.carried_bytes(),
        cand_carried_bytes=cand.carried_bytes(),
    )


def measure(source: Adapter, written: Adapter) -> tuple[float | None, dict[str, ModuleFit], list[str]]:
    """(total ΔW error, per-module errors, all-zero modules) of the written adapter against the source."""
    errors = delta_errors(source, written)
    modules = {e.name: ModuleFit(rel_error=e.rel_error, abs_error=e.abs_error, ref_norm=e.ref_norm) for e in errors.modules}
    return errors.total_rel_error, modules, [e.name for e in errors.modules if e.ref_norm == 0]
