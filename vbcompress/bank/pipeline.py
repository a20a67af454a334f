"""The fit pipeline every encoding command shares (``lora2vb``, ``pack``, ``add``): settings resolved and
checked against the sources, the bank fit run deterministically, and calibration inputs chosen."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import LINEAR, Adapter
from ..basemodel import Base, read_texts
from ..errors import SettingError, ShapeError, VBCompressError
from ..settings import CalibrationSettings, FitSettings, Progress, resolve_device
from .fit import FitResult, fit_bank
from .mixing import deterministic

VECTOR_LENGTHS = (256, 128, 64, 32, 16)


def auto_vector_length(adapter: Adapter) -> int:
    """The largest of 256, 128, 64, 32, 16 that divides every module's in and out dimension."""
    for length in VECTOR_LENGTHS:
        if all(m.in_features % length == 0 and m.out_features % length == 0 for m in adapter.modules.values()):
            return length
    dims = sorted({d for m in adapter.modules.values() for d in (m.in_features, m.out_features)})
    raise ShapeError(adapter.source, f"no vector length in {VECTOR_LENGTHS} divides every layer dimension {dims}")


def check_compressible(adapter: Adapter, length: int) -> None:
    """Refuse what PEFT's VB-LoRA cannot express, naming the module."""
    for m in adapter.modules.values():
        if m.kind != LINEAR:
            raise ShapeError(adapter.source, f"module {m.name}: VB-LoRA supports linear layers only, this one is {m.kind}")
        for what, dim in (("in", m.in_features), ("out", m.out_features)):
            if dim % length:
                raise ShapeError(adapter.source, f"module {m.name}: {what} dimension {dim} is not divisible by vector length {length}")
    if adapter.config.get("use_dora") or any("lora_magnitude_vector" in k for k in adapter.carried):
        raise VBCompressError(adapter.source, "DoRA adapters cannot be written as VB-LoRA (no magnitude vector there)")
    if any(k.endswith("lora_B.bias") for k in adapter.carried):
        raise VBCompressError(adapter.source, "LoRA biases (lora_bias=true) cannot be written as VB-LoRA")
    adapter.fan_in_fan_out()


def fit_settings_for(sources: list[Adapter], fit: FitSettings) -> FitSettings:
    """``fit`` with vector length, rank and device resolved against the sources, after checking that
    every source can be written with them."""
    fit.check()
    length = fit.vector_length or auto_vector_length(sources[0] if len(sources) == 1 else merged_view(sources))
    max_rank = max(max(s.ranks) for s in sources)
    for source in sources:
        check_compressible(source, length)
    if fit.rank is not None and fit.rank > max_rank:
        raise SettingError("rank", f"{{setting}} {fit.rank} must be between 1 and the adapter's rank {max_rank}", where=sources[0].source)
    if fit.topk > 1 and fit.num_vectors < 2:
        raise SettingError("topk", f"{{setting}} {fit.topk} needs at least 2 vectors")
    return replace(fit, vector_length=length, rank=fit.rank or max_rank, device=resolve_device(fit.device))


def merged_view(sources: list[Adapter]) -> Adapter:
    """All sources' modules in one adapter (names prefixed by position), for checks that span them."""
    return Adapter(modules={f"{i}/{n}": m for i, s in enumerate(sources) for n, m in s.modules.items()}, source=sources[0].source)


def run_fit(factors: dict, fit: FitSettings, progress: Progress | None, **options) -> FitResult:
    """:func:`~vbcompress.bank.fit.fit_bank`, deterministic on every device."""
    # CUDA's index_add/scatter kernels accumulate with atomics: only deterministic mode makes runs repeatable.
    with deterministic() if fit.device == "cuda" else contextlib.nullcontext():
        return fit_bank(factors, fit, progress, **options)


def calibration_texts(
    model: Base, texts_file: str | Path | None, settings: CalibrationSettings, seed: int, teacher: dict[str, torch.Tensor] | None = None
) -> tuple[list[str], str]:
    """The calibration inputs and a label for the report: the file's lines (checked against the model's
    context), or data-free inputs (for causal LMs sampled from the base with ``teacher`` ΔW applied)."""
    if texts_file is not None:
        texts = read_texts(texts_file)
        model.check_length(texts, texts_file, settings.max_length)
        return texts, "file"
    model.check_length([], model.base, settings.max_length)
    texts = model.data_free_texts(
        settings.samples, torch.Generator().manual_seed(seed), settings.max_length // 2, teacher if model.causal else None
    )
    if not model.causal:
        return texts, "data-free: random vocabulary"
    return texts, "data-free: samples of the base with the adapter" if teacher else "data-free: samples of the base model"
