"""Size first: what a VB-LoRA output of given settings costs, before any fit, and the bank size (N) that fits a
byte budget. ``lora2vb --dry-run`` prints these next to the plain representations at the same bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from .adapter import Adapter
from .codec.layout import index_dtype, stored_index_dtype
from .errors import SettingError
from .settings import FitSettings, OutputSettings, SizeSettings
from .verdict import Plain, best_plain

CANDIDATE_VECTORS = tuple(2**i for i in range(1, 16))  # N = 2 … 32768


def vb_bytes(adapter: Adapter, fit: FitSettings, output: OutputSettings) -> int:
    """Bytes of the compact VB-LoRA file's bank, indices and float32 top-k weights for ``adapter`` at ``fit``
    (vector length and rank resolved), exactly as :func:`~vbcompress.codec.layout.vb_stored_bytes` counts them."""
    length, rank = fit.vector_length, fit.rank
    subvectors = sum(rank * (m.in_features // length + m.out_features // length) for m in adapter.modules.values())
    idx = torch.empty(0, dtype=index_dtype(fit.num_vectors)).element_size()
    bank = fit.num_vectors * length * (4 if output.bank_dtype == "float32" else 2)
    return bank + subvectors * (fit.topk * idx + (fit.topk - 1) * 4)


def budget_for(fp16_bytes: int, size: SizeSettings) -> int | None:
    """The byte budget ``size`` sets: ``max_bytes``, or ``target_ratio`` of ``fp16_bytes``; None without one."""
    if size.max_bytes is not None:
        return size.max_bytes
    if size.target_ratio is not None:
        return int(size.target_ratio * fp16_bytes)
    return None


def budget_of(adapter: Adapter, size: SizeSettings) -> int | None:
    """The byte budget ``size`` sets for one adapter (a ratio is of its fp16 bytes)."""
    return budget_for(adapter.fp16_bytes(), size)


def collection_budget(adapters: list[Adapter], size: SizeSettings) -> int | None:
    """The byte budget ``size`` sets for a whole collection (a ratio is of every source's fp16 bytes together)."""
    return budget_for(sum(a.fp16_bytes() for a in adapters), size)


def largest_fitting(fit: FitSettings, size: SizeSettings, budget: int | None, cost: Callable[[FitSettings], int], what: str) -> FitSettings:
    """``fit`` with the largest N (a power of two) whose ``cost`` fits ``budget``; unchanged without one.
    ``what`` names the output in the error when even the smallest N does not fit."""
    if budget is None:
        return fit
    fitting = [n for n in CANDIDATE_VECTORS if n >= fit.topk and cost(replace(fit, num_vectors=n)) <= budget]
    if not fitting:
        least = cost(replace(fit, num_vectors=max(2, fit.topk)))
        setting = "max_bytes" if size.max_bytes is not None else "target_ratio"
        raise SettingError(setting, f"{{setting}} allows {budget} bytes{what} needs {least} (fewer -k or a lower --rank)")
    return replace(fit, num_vectors=max(fitting))


def fit_for_budget(adapter: Adapter, fit: FitSettings, output: OutputSettings, size: SizeSettings) -> FitSettings:
    """``fit`` with the largest N whose VB-LoRA output of ``adapter`` fits the budget; unchanged without one."""
    cost = lambda f: vb_bytes(adapter, f, output)
    return largest_fitting(fit, size, budget_of(adapter, size), cost, "; the smallest VB-LoRA output of this adapter")


def collection_bytes(adapters: list[Adapter], fit: FitSettings, output: OutputSettings) -> int:
    """Bytes of a collection of ``adapters`` held as bank codes at ``fit`` (vector length resolved): the bank,
    plus each adapter's indices (the smallest integer type below N) and k−1 float16 weights per sub-vector, at
    its own rank capped by ``fit.rank``, as :mod:`vbcompress.collection` stores them."""
    length, k = fit.vector_length, fit.topk
    idx = torch.empty(0, dtype=stored_index_dtype(fit.num_vectors)).element_size()
    rows = 0
    for adapter in adapters:
        rank = min(fit.rank or max(adapter.ranks), max(adapter.ranks))
        rows += sum(rank * (m.in_features // length + m.out_features // length) for m in adapter.modules.values())
    return fit.num_vectors * length * (4 if output.bank_dtype == "float32" else 2) + rows * (k * idx + (k - 1) * 2)


def fit_collection_for_budget(adapters: list[Adapter], fit: FitSettings, output: OutputSettings, size: SizeSettings) -> FitSettings:
    """``fit`` with the largest N whose collection of bank codes fits the budget; unchanged without one."""
    cost = lambda f: collection_bytes(adapters, f, output)
    return largest_fitting(fit, size, collection_budget(adapters, size), cost, " for the collection; its smallest bank and codes")


@dataclass
class SizeRow:
    num_vectors: int
    bytes: int
    ratio: float
    plain: Plain | None  # the best plain representation in the same bytes


@dataclass
class DryRunReport:
    """What ``lora2vb`` would write at a few bank sizes, and what plain truncation keeps at those bytes."""

    source: str
    source_fp16_bytes: int
    vector_length: int
    topk: int
    rank: int
    rows: list[SizeRow] = field(default_factory=list)
    chosen: int | None = None  # N for the byte budget, when one was given

    def to_json(self) -> dict:
        return asdict(self)


def dry_run(src: str, adapter: Adapter, fit: FitSettings, output: OutputSettings, size: SizeSettings) -> DryRunReport:
    """Bytes, ratio and the best plain representation's ΔW error at N = 64 … 4096 (and at the budget's N)."""
    chosen = fit_for_budget(adapter, fit, output, size).num_vectors if budget_of(adapter, size) is not None else None
    report = DryRunReport(src, adapter.fp16_bytes(), fit.vector_length, fit.topk, fit.rank, chosen=chosen)
    for n in sorted({64, 128, 256, 512, 1024, 2048, 4096, fit.num_vectors} | ({chosen} if chosen else set())):
        size_n = vb_bytes(adapter, replace(fit, num_vectors=n), output)
        report.rows.append(SizeRow(n, size_n, size_n / adapter.fp16_bytes(), best_plain(adapter.modules.values(), size_n)))
    return report
