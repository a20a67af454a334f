"""The reports commands return: dataclasses with ``to_json()``, read by field in the CLI and the model card.

``to_json`` writes the keys ``vbcompress.json`` has always had, so users who parse it keep working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .bank.calibrate import CalibrationReport
from .baselines import Baseline
from .hub import HubSource, Pushed
from .metrics import ModuleFit
from .settings import FitSettings, OutputSettings
from .verdict import Verdict
from .version import __version__


@dataclass
class ByteCounts:
    """Bytes of the source and of the VB-LoRA output; ``ratio = vb / source_fp16``."""

    source_stored: int
    source_fp16: int
    vb: int
    bank: int
    codes: int
    carried: int

    @property
    def ratio(self) -> float:
        return self.vb / self.source_fp16 if self.source_fp16 else float("nan")


@dataclass
class FitStages:
    """Exact ΔW error (at the kept rank, before fp16/top-k rounding) after each stage of the fit."""

    seed: float
    alternate: float
    refine: float


@dataclass
class CompressReport:
    """What ``lora2vb`` wrote and what it kept; also written to ``OUT/vbcompress.json``."""

    source: str
    source_format: str
    fit: FitSettings  # as run: vector length, rank and device resolved
    output: OutputSettings
    total_rel_error: float | None
    modules: dict[str, ModuleFit]
    bytes: ByteCounts
    svd_baseline: Baseline
    fit_stages: FitStages
    hub_source: HubSource | None = None
    calibration: CalibrationReport | None = None
    pushed: Pushed | None = None
    vbcompress_version: str = __version__
    zero_modules: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    search: list[dict] | None = None  # --min-kl-retention: each N tried, its bytes and held-out retention, in order
    search_target: float | None = None

    @property
    def svd_keeps_more(self) -> bool:
        """A plain representation (SVD factors at fp16, int8 or int4) keeps more in no more bytes."""
        if self.verdict is not None:
            return self.verdict.kind == "plain"
        return self.total_rel_error is not None and self.svd_baseline.rel_error < self.total_rel_error

    def to_json(self) -> dict:
        f = self.fit
        out = {
            "vbcompress_version": self.vbcompress_version,
            "source": self.source,
            "hub_source": asdict(self.hub_source) if self.hub_source else None,
            "source_format": self.source_format,
            "settings": {
                "num_vectors": f.num_vectors,
                "vector_length": f.vector_length,
                "topk": f.topk,
                "rank": f.rank,
                "device": f.device,
                "seed": f.seed,
                "iters": f.iters,
                "refine_steps": f.refine_steps,
                "full_logits": self.output.full_logits,
                "bank_dtype": self.output.bank_dtype,
            },
            "total_rel_error": self.total_rel_error,
            "modules": {name: asdict(m) for name, m in self.modules.items()},
            "zero_modules": self.zero_modules,
            "bytes": {**asdict(self.bytes), "ratio": self.bytes.ratio},
            "svd_baseline": {"rank": self.svd_baseline.rank, "bytes": self.svd_baseline.bytes, "rel_error": self.svd_baseline.rel_error},
            "fit_stages": asdict(self.fit_stages),
            "calibration": asdict(self.calibration) if self.calibration else None,
            "verdict": self.verdict.to_json() if self.verdict else None,
            "search": {"min_kl_retention": self.search_target, "tried": self.search} if self.search else None,
        }
        if self.pushed is not None:
            out["pushed"] = asdict(self.pushed)
        return out
