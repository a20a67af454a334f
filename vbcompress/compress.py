"""``lora2vb``: distill a trained LoRA into a PEFT-loadable VB-LoRA adapter, with an honest report."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .adapter import LINEAR, Adapter, VectorBank
from .bank.fit import FitSettings, fit_bank
from .card import model_card, source_metadata
from .errors import ShapeError, VBCompressError
from .files import atomic_output_dir, write_json
from .formats import load_adapter, write_vblora
from .formats.vblora import canonical_code
from .hub import download, is_hub_ref, local_path
from .linalg import singular_values
from .metrics import delta_errors

VECTOR_LENGTHS = (256, 128, 64, 32, 16)
REPORT_FILE = "vbcompress.json"


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
    if len({m.fan_in_fan_out for m in adapter.modules.values()}) > 1:
        raise ShapeError(adapter.source, "VB-LoRA has one fan_in_fan_out per adapter; this one mixes both layouts")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise VBCompressError(None, "--device cuda asked for, but torch sees no CUDA device")
    return device


def svd_baseline(adapter: Adapter, budget_bytes: int) -> dict:
    """Error of plain SVD truncation to one global rank whose fp16 factors fit in ``budget_bytes``."""
    spectra = [(singular_values(*m.folded()), m.in_features + m.out_features) for m in adapter.modules.values()]
    per_rank = sum(2 * dims for _, dims in spectra)
    rank = min(budget_bytes // per_rank if per_rank else 0, max(m.r for m in adapter.modules.values()))
    total = sum(float(s.square().sum()) for s, _ in spectra)
    lost = sum(float(s[rank:].square().sum()) for s, _ in spectra)
    return {"rank": int(rank), "bytes": int(rank * per_rank), "rel_error": math.sqrt(lost / total) if total > 0 else 0.0}


def lora2vb(
    src: str | Path,
    out: str | Path,
    *,
    num_vectors: int = 256,
    vector_length: int | None = None,
    topk: int = 2,
    rank: int | None = None,
    device: str = "auto",
    seed: int = 0,
    iters: int = 20,
    refine_steps: int = 300,
    full_logits: bool = False,
    bank_dtype: str = "float32",
    base: str | Path | None = None,
    calibration: str | Path | None = None,
    calib_steps: int = 400,
    calib_lr: float = 1e-2,
    calib_samples: int = 256,
    format: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int, float], None] | None = None,
    token: str | None = None,
    repo_id: str | None = None,
) -> dict:
    """Distill the LoRA at ``src`` into one vector bank and write a PEFT VB-LoRA adapter to ``out``.

    Returns the report also written to ``out/vbcompress.json``: settings, per-module and total ΔW error
    (recomputed from the written files, against the full source), bytes and compression ratio, and the
    error of SVD truncation at the same byte budget for comparison.

    With ``base`` (a model directory), the weight-space fit is followed by function-space calibration on
    ``calibration`` text (a file) or, without one, on data-free inputs; see :mod:`vbcompress.bank.calibrate`.

    ``src`` and ``base`` may be Hub ids (``owner/name[@revision]``; ``token`` for private ones). ``out`` also
    gets a README.md model card; ``repo_id`` is the name it tells users to load the adapter by.
    """
    hub_source = None
    if is_hub_ref(src):
        fetched = download(src, "adapter", token=token)
        hub_source = {"ref": str(src), "repo": fetched.ref.repo_id, "revision": fetched.ref.revision or "main", "commit": fetched.commit}
        path = fetched.path
    else:
        path = Path(src)
    source = load_adapter(path, format=format)
    length = vector_length or auto_vector_length(source)
    check_compressible(source, length)
    max_rank = max(source.ranks)
    if rank is not None and not 1 <= rank <= max_rank:
        raise VBCompressError(src, f"--rank {rank} must be between 1 and the adapter's rank {max_rank}")
    if topk < 1 or topk > num_vectors or (topk > 1 and num_vectors < 2):
        raise VBCompressError(None, f"--topk {topk} must be between 1 and --num-vectors {num_vectors}")
    if bank_dtype not in ("float32", "float16"):
        raise VBCompressError(None, f"--bank-dtype must be float32 or float16, not {bank_dtype}")
    dev = resolve_device(device)
    settings = FitSettings(
        num_vectors=num_vectors, vector_length=length, topk=topk, rank=rank or max_rank,
        iters=iters, refine_steps=refine_steps, seed=seed, device=dev,
    )  # fmt: skip
    model = texts = None
    if base is not None:  # load and check the base before any training
        from .bank.calibrate import Base, read_texts

        model = Base(local_path(base, "base", token=token), source)
        texts = read_texts(calibration) if calibration else None
    elif calibration is not None:
        raise VBCompressError(calibration, "--calibration needs --base")
    factors = {name: m.folded() for name, m in source.modules.items()}
    # CUDA's index_add/scatter kernels accumulate with atomics: only deterministic mode makes runs repeatable.
    with deterministic() if dev == "cuda" else contextlib.nullcontext():
        fit = fit_bank(factors, settings, progress)
    fitted, calib_report = VectorBank(bank=fit.bank, topk=topk, codes=fit.codes), None
    if model is not None:
        from .bank.calibrate import CalibrationSettings, calibrate

        cal = CalibrationSettings(steps=calib_steps, samples=calib_samples, lr=calib_lr, seed=seed)
        data = "file" if texts else "data-free: " + ("samples of the base model" if model.causal else "random vocabulary")
        if texts is None:
            texts = model.data_free_texts(calib_samples, torch.Generator().manual_seed(seed), cal.max_length // 2)
        fitted, calib_report = calibrate(source, fitted, model, texts, cal, progress)
        calib_report.update(base=str(base), data=data, calibration_file=str(calibration) if calibration else None)
    bank = fitted.bank.to(getattr(torch, bank_dtype))
    codes = {name: canonical_code(code) for name, code in fitted.codes.items()}
    result = Adapter(
        modules={},
        carried=dict(source.carried),
        source_format="vblora",
        base_model=source.base_model,
        task_type=source.task_type,
        target_modules=source.target_modules if source.source_format == "peft" else None,
        modules_to_save=source.modules_to_save,
        source=str(out),
        vector_bank=VectorBank(bank=bank, topk=topk, codes=codes),
    )
    for name, m in source.modules.items():
        a, b = result.vector_bank.decode(name)
        result.modules[name] = type(m)(name=name, A=a, B=b, scale=1.0, fan_in_fan_out=m.fan_in_fan_out)
    with atomic_output_dir(out, overwrite=overwrite, inputs=(path,)) as tmp:
        write_vblora(result, tmp, full_logits=full_logits)
        written = load_adapter(tmp)  # the report describes the files, not our in-memory copy
        errors = delta_errors(source, written)
        vb_bytes = written.stored_bytes()
        report = {
            "vbcompress_version": __version__,
            "source": str(src),
            "hub_source": hub_source,
            "source_format": source.source_format,
            "settings": {
                "num_vectors": num_vectors, "vector_length": length, "topk": topk, "rank": settings.rank,
                "device": dev, "seed": seed, "iters": iters, "refine_steps": refine_steps,
                "full_logits": full_logits, "bank_dtype": bank_dtype,
            },
            "total_rel_error": errors.total_rel_error,
            "modules": {e.name: {"rel_error": e.rel_error, "abs_error": e.abs_error, "ref_norm": e.ref_norm} for e in errors.modules},
            "zero_modules": [e.name for e in errors.modules if e.ref_norm == 0],
            "bytes": {
                "source_stored": source.stored_bytes(),
                "source_fp16": source.fp16_bytes(),
                "vb": vb_bytes,
                "bank": bank.numel() * bank.element_size(),
                "codes": vb_bytes - bank.numel() * bank.element_size(),
                "carried": source.carried_bytes(),
                "ratio": vb_bytes / source.fp16_bytes(),
            },
            "svd_baseline": svd_baseline(source, vb_bytes),
            # Exact ΔW error (at the kept rank, before fp16/top-k rounding) after each stage of the fit.
            "fit_stages": {
                "seed": fit.history[0][1],
                "alternate": min((e for s, e in fit.history if s == "alternate"), default=fit.history[0][1]),
                "refine": fit.rel_error,
            },
            "calibration": calib_report,
        }  # fmt: skip
        write_json(tmp / REPORT_FILE, report)
        card = model_card(report, base_model=source.base_model, task_type=source.task_type, source_meta=source_metadata(path), repo_id=repo_id)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return report


@contextlib.contextmanager
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
