"""``inspect``: what an adapter holds, module by module, without forming dense ΔW."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import SettingError
from .formats import load_adapter
from .hub import resolve
from .linalg import singular_values
from .rank import choose_rank
from .settings import RankSettings


@dataclass
class ModuleInfo:
    """One module: shape, rank, scale, ‖ΔW‖_F, σ_max, SARA effective rank, top-direction share of ‖ΔW‖²."""

    name: str
    kind: str
    out: int
    inp: int
    r: int
    scale: float
    fan_in_fan_out: bool
    params: int
    nonfinite: bool
    zero: bool = False
    norm: float | None = None
    sigma_max: float | None = None
    effective_rank: int | None = None
    top_energy: float | None = None

    def to_json(self) -> dict:
        row = asdict(self)
        row["in"] = row.pop("inp")
        return row


@dataclass
class InspectReport:
    """What ``inspect`` prints (``--json`` writes ``to_json()``)."""

    path: str
    file: str | None
    format: str
    base_model: str | None
    task_type: str | None
    dtype: str
    ranks: list[int]
    lora_params: int
    stored_bytes: int
    fp16_bytes: int
    carried_params: int
    carried_bytes: int
    carried_keys: list[str]
    vector_bank: dict | None  # num_vectors, vector_length, topk
    threshold: float
    modules: list[ModuleInfo]

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    @property
    def zero_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.zero]

    @property
    def nonfinite_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.nonfinite]

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "modules"}
        out.update(num_modules=self.num_modules, zero_modules=self.zero_modules, nonfinite_modules=self.nonfinite_modules)
        out["modules"] = [m.to_json() for m in self.modules]
        return out


def inspect_adapter(
    path: str | Path, threshold: float = RankSettings.threshold, format: str | None = None, *, token: str | None = None
) -> InspectReport:
    """A summary of the adapter at ``path`` (a local path or Hub id).

    Per module: shape, rank, scale, ‖ΔW‖_F, largest σ, effective rank by the SARA rule at ``threshold``,
    share of ‖ΔW‖²_F in the top direction, and whether it is all zero or holds NaN/Inf.
    Non-finite adapters are reported, not refused.
    """
    if not 0 < threshold <= 1:
        raise SettingError("threshold", f"{{setting}} {threshold} must be in (0, 1]: the share of Σσ the effective rank keeps")
    adapter = load_adapter(resolve(path, "adapter", token=token).path, format=format, allow_nonfinite=True)
    modules = []
    for name, m in adapter.modules.items():
        finite = bool(torch.isfinite(m.A).all() and torch.isfinite(m.B).all())
        row = ModuleInfo(
            name=name,
            kind=m.kind,
            out=m.out_features,
            inp=m.in_features,
            r=m.r,
            scale=m.scale,
            fan_in_fan_out=m.fan_in_fan_out,
            params=m.num_params,
            nonfinite=not finite,
        )
        if finite:
            b, a = m.folded()
            s = singular_values(b, a)
            energy = float(s.square().sum())
            row.zero = energy == 0.0
            row.norm = energy**0.5
            row.sigma_max = float(s[0]) if s.numel() else 0.0
            row.effective_rank = choose_rank(s, "sara", threshold)
            row.top_energy = float(s[0] ** 2 / energy) if energy > 0 else None
        modules.append(row)
    vb = adapter.vector_bank
    return InspectReport(
        path=str(path),
        file=adapter.source,
        format=adapter.source_format,
        base_model=adapter.base_model,
        task_type=adapter.task_type,
        dtype=adapter.dtype,
        ranks=adapter.ranks,
        lora_params=adapter.num_lora_params,
        stored_bytes=adapter.stored_bytes(),
        fp16_bytes=adapter.fp16_bytes(),
        carried_params=adapter.num_carried_params,
        carried_bytes=adapter.carried_bytes(),
        carried_keys=sorted(adapter.carried),
        vector_bank=None if vb is None else {"num_vectors": vb.num_vectors, "vector_length": vb.vector_length, "topk": vb.topk},
        threshold=threshold,
        modules=modules,
    )
