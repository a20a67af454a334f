"""``vb2lora`` / ``resize``: any readable adapter → dense LoRA (PEFT, kohya or diffusers), at a fixed or per-module adaptive rank.

Each module's ΔW is factored by SVD from its low-rank factors (QR + r×r SVD; a VB-LoRA module is
decoded from its bank first), truncated, and written balanced (``B = U√S``, ``A = √S Vh``) with the
scale folded into the factors. Every loader then computes the same ΔW: PEFT's per-module
``alpha_pattern[m] / rank_pattern[m]``, a loader that ignores the patterns (vLLM) with the global
``lora_alpha / r``, kohya's ``alpha / r`` and diffusers' default ``alpha = r`` are all 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .adapter import Adapter
from .errors import SettingError
from .files import CAST_DTYPES, write_json
from .formats import check_dense_format, family_of, load_adapter, write_dense
from .formats.kohya import written_by_vbcompress
from .hub import resolve
from .linalg import low_rank_svd
from .output import claim_output
from .rank import choose_rank, retained
from .settings import RankSettings

REPORT_FILE = "vbcompress.json"


@dataclass
class RankRow:
    """One module's rank choice: source and kept rank, shares of ‖ΔW‖_F and Σσ kept, energies (Σσ²)."""

    name: str
    source_rank: int
    rank: int
    retained_fro: float
    retained_sigma: float
    energy: float
    kept_energy: float


@dataclass
class DenseReport:
    """What ``vb2lora``/``resize`` wrote; also written to ``OUT/vbcompress.json``."""

    source: str
    source_format: str
    rank: int | str | None
    rule: str | None
    threshold: float | None
    modules: list[RankRow]
    retained_fro: float
    rel_error: float
    bytes_before: int
    bytes_after: int | None = None
    written_format: str = "peft"
    file: str | None = None  # the weights file, relative to the output folder

    def to_json(self) -> dict:
        return asdict(self)


def truncate(adapter: Adapter, rank: int | str | None = None, settings: RankSettings | None = None) -> tuple[Adapter, list[RankRow]]:
    """A LoRA copy of ``adapter`` truncated per module, and per-module rows (rank, retained shares).

    ``rank``: an int (same cap for every module), ``"auto"`` (chosen by ``settings.rule`` at
    ``settings.threshold``), or None (each module's own rank: reproduces ΔW).
    """
    settings = settings or RankSettings()
    settings.check()
    if rank not in (None, "auto") and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise SettingError("rank", f"{{setting}} must be a positive integer or 'auto', not {rank!r}")
    modules, rows = {}, []
    for name, m in adapter.modules.items():
        b, a = m.folded()
        u, s, vh = low_rank_svd(b, a)
        if rank == "auto":
            try:
                k = choose_rank(s, settings.rule, settings.threshold)
            except ValueError as e:
                raise SettingError("threshold", f"{{setting}}: {e}") from None
        else:
            # As PEFT's convert_to_lora: a fixed rank is kept even where trailing σ are ~0.
            k = s.numel() if rank is None else min(rank, s.numel())
        fro, nuc = retained(s, k)
        keep = max(k, 1)  # PEFT needs r ≥ 1: an all-zero module becomes rank 1 with zero factors
        root = s[:keep].sqrt()
        dtype = m.A.dtype if m.A.is_floating_point() and adapter.vector_bank is None else torch.float32
        modules[name] = replace(m, A=(root[:, None] * vh[:keep]).to(dtype), B=(u[:, :keep] * root).to(dtype), scale=1.0, alpha=None)
        rows.append(
            RankRow(
                name=name,
                source_rank=m.r,
                rank=k,
                retained_fro=fro,
                retained_sigma=nuc,
                energy=float(s.square().sum()),
                kept_energy=float(s[:k].square().sum()),
            )
        )
    out = replace(
        adapter, modules=modules, vector_bank=None, source_format="peft" if adapter.source_format == "vblora" else adapter.source_format
    )
    return out, rows


def to_lora(
    src: str | Path,
    out: str | Path,
    rank: int | str | None = None,
    settings: RankSettings | None = None,
    *,
    format: str | None = None,
    to: str | None = None,
    overwrite: bool = False,
    token: str | None = None,
) -> DenseReport:
    """Convert the adapter at ``src`` (a path or Hub id) to a dense LoRA in ``out``, written as ``to``
    (``peft``, ``kohya`` or ``diffusers``; default: the source's own family, PEFT for anything else);
    returns (and writes) the report. An ``out`` ending in ``.safetensors`` is one kohya file, as ComfyUI
    and A1111 load it (no report file beside it: the report is returned)."""
    settings = settings or RankSettings()
    check_dense_format(to)
    as_file = Path(out).suffix == ".safetensors"
    if as_file and to not in (None, "kohya"):
        raise SettingError("to", f"an output named *.safetensors is one kohya file, not {to}: name a folder for {{setting}} {to}")
    got = resolve(src, "adapter", token=token)
    with claim_output(out, overwrite, inputs=(got.path,), ours=written_by_vbcompress if as_file else None) as target:
        return _to_lora(src, got.path, target, rank, settings, format, "kohya" if as_file else to)


def _to_lora(src, path: Path, target, rank, settings: RankSettings, format, to) -> DenseReport:
    source = load_adapter(path, format=format)
    to = to or family_of(source.source_format)
    lora, rows = truncate(source, rank, settings)
    total = sum(r.energy for r in rows)
    kept = sum(r.kept_energy for r in rows)
    report = DenseReport(
        source=str(src),
        source_format=source.source_format,
        rank=rank,
        rule=settings.rule if rank == "auto" else None,
        threshold=settings.threshold if rank == "auto" else None,
        modules=rows,
        retained_fro=math.sqrt(kept / total) if total > 0 else 1.0,
        rel_error=math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0,
        bytes_before=source.stored_bytes(),
        written_format=to,
    )
    with target.write() as tmp:
        name = target.out.stem if target.single_file else target.out.name
        file = write_dense(lora, tmp, to, dtype=CAST_DTYPES[settings.dtype], name=name)
        report.file = file.name
        report.bytes_after = target.read_back(load_adapter, tmp).stored_bytes()
        if not target.single_file:
            write_json(tmp / REPORT_FILE, report.to_json())
    return report
