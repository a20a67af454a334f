"""``lora2vb`` and ``hub``: distill a trained LoRA into a PEFT-loadable VB-LoRA adapter, with an honest report.

The command is a pipeline of small steps: resolve the inputs (Hub ids become local paths here, once),
check settings against the adapter, fit the bank in weight space, optionally calibrate it on a base model,
write the output atomically, and measure the written files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .adapter import Adapter
from .bank.calibrate import Calibration, CalibrationReport
from .bank.fit import FitResult
from .bank.pipeline import calibration_texts, fit_settings_for, run_fit
from .baselines import truncation
from .basemodel import Base
from .card import model_card, source_metadata
from .codec.layout import VectorBank, canonical_code
from .errors import SettingError
from .files import REPORT_FILE, write_json
from .formats import load_adapter, write_vblora
from .hub import HubSource, create_repo, push, resolve
from .metrics import measure
from .output import OutputTarget, claim_output
from .results import ByteCounts, CompressReport, FitStages
from .retention import Probe
from .settings import CalibrationSettings, FitSettings, OutputSettings, Progress, SizeSettings
from .sizing import DryRunReport, budget_of, dry_run, fit_for_budget, vb_bytes
from .verdict import Verdict, best_plain, judge


def fit_stages(fit: FitResult) -> FitStages:
    first = fit.history[0][1]
    return FitStages(seed=first, alternate=min((e for s, e in fit.history if s == "alternate"), default=first), refine=fit.rel_error)


def lora2vb(
    src: str | Path,
    out: str | Path,
    fit: FitSettings | None = None,
    *,
    output: OutputSettings | None = None,
    base: str | Path | None = None,
    calibration: CalibrationSettings | None = None,
    texts: str | Path | None = None,
    format: str | None = None,
    overwrite: bool = False,
    token: str | None = None,
    repo_id: str | None = None,
    progress: Progress | None = None,
    size: SizeSettings | None = None,
) -> CompressReport | DryRunReport:
    """Distill the LoRA at ``src`` into one vector bank and write a PEFT VB-LoRA adapter to ``out``.

    ``size`` puts size first: a byte budget (``max_bytes`` or ``target_ratio``) chooses N; ``dry_run``
    returns a :class:`~vbcompress.sizing.DryRunReport` (bytes and plain baselines at a few N) and writes nothing.

    Returns the report also written to ``out/vbcompress.json``: settings as run, per-module and total ΔW
    error (recomputed from the written files, against the full source), bytes and compression ratio, and
    the error of SVD truncation at the same byte budget for comparison.

    With ``base`` (a model directory or Hub id), the weight-space fit is followed by function-space
    calibration (``calibration`` settings, default :class:`CalibrationSettings`) on the ``texts`` file or,
    without one, on data-free inputs. ``src`` and ``base`` may be Hub ids (``token`` for private ones).
    ``out`` also gets a README.md model card; ``repo_id`` is the name it tells users to load the adapter by.
    """
    fit, output, size = fit or FitSettings(), output or OutputSettings(), size or SizeSettings()
    output.check()
    size.check()
    got = resolve(src, "adapter", token=token)
    if size.dry_run:
        source = load_adapter(got.path, format=format)
        return dry_run(str(src), source, fit_settings_for([source], fit), output, size)
    if out is None:
        raise SettingError("out", "an output folder ({setting}) is needed unless this is a dry run")
    base_path = resolve(base, "base", token=token).path if base is not None else None
    with claim_output(out, overwrite, inputs=(got.path, base_path, texts)) as target:  # before any work
        return _lora2vb(src, got, target, fit, output, base_path, base, calibration, texts, format, repo_id, progress, size)


def _lora2vb(
    src, got, target: OutputTarget, fit, output, base_path, base, calibration, texts, format, repo_id, progress, size
) -> CompressReport:
    source = load_adapter(got.path, format=format)
    fit = fit_for_budget(source, fit_settings_for([source], fit), output, size)
    model = None
    if base is not None:  # load and check the base before any training
        calibration = calibration or CalibrationSettings()
        calibration.check()
        model, base_label = Base(base_path, source, device=fit.device), str(base)
        teacher = source.delta_weights()
        inputs, label = calibration_texts(model, texts, calibration, fit.seed, teacher=teacher)
    elif texts is not None:
        raise SettingError("texts", "calibration text ({setting}) needs a base model", where=texts)
    problem = probe = None
    if model is not None:
        # prepared once: a retention target's search calibrates at several N against the same targets
        problem = Calibration(source, model, inputs, calibration, seed=fit.seed, teacher=teacher)
        probe = Probe(model, problem.held, teacher, calibration.max_length)

    def encode(fit: FitSettings):
        # balanced once: the verdict's plain baselines read the same cached factors
        result = run_fit({name: m.balanced() for name, m in source.modules.items()}, fit, progress)
        fitted, calib_report = VectorBank(bank=result.bank, topk=fit.topk, codes=result.codes), None
        if problem is not None:
            fitted, calib_report = problem.run(fitted, progress)
            calib_report = replace(calib_report, base=base_label, data=label, calibration_file=str(texts) if texts else None)
        return fit, result, fitted, calib_report

    search = None
    if size.min_kl_retention is not None:
        if model is None:
            raise SettingError("min_kl_retention", "{setting} is measured on a base model: give --base")
        (fit, result, fitted, calib_report), search = smallest_reaching(source, fit, output, size, encode)
    else:
        fit, result, fitted, calib_report = encode(fit)
    vb = VectorBank(
        bank=fitted.bank.to(getattr(torch, output.bank_dtype)),
        topk=fit.topk,
        codes={name: canonical_code(code) for name, code in fitted.codes.items()},
    )
    return write_compressed(
        source,
        vb,
        target,
        fit=fit,
        output=output,
        stages=fit_stages(result),
        src=src,
        source_path=got.path,
        hub_source=got.hub,
        calibration=calib_report,
        repo_id=repo_id,
        probe=probe,
        search=(search, size.min_kl_retention),
    )


SEARCH_VECTORS = (64, 128, 256, 512, 1024, 2048, 4096)


def smallest_reaching(source: Adapter, fit: FitSettings, output: OutputSettings, size: SizeSettings, encode) -> tuple[tuple, list[dict]]:
    """The encoding at the smallest N whose held-out retention reaches ``size.min_kl_retention`` (bisection over
    :data:`SEARCH_VECTORS` within any byte budget, retention taken to grow with N), or the largest N's when none
    does; and every try as ``{num_vectors, bytes, retention, met}``."""
    cap = fit_for_budget(source, fit, output, size).num_vectors if budget_of(source, size) is not None else max(SEARCH_VECTORS)
    candidates = [n for n in SEARCH_VECTORS if fit.topk <= n <= cap] or [cap]
    tried, done, met = [], {}, {}

    def attempt(i: int) -> bool:
        if i not in done:
            done[i] = encode(replace(fit, num_vectors=candidates[i]))
            cal = done[i][3]
            kept = cal.retention_after.headline if cal is not None and cal.retention_after is not None else None
            met[i] = kept is not None and kept >= size.min_kl_retention
            tried.append({"num_vectors": candidates[i], "bytes": vb_bytes(source, done[i][0], output), "retention": kept, "met": met[i]})
        return met[i]

    lo, hi = 0, len(candidates) - 1
    if not attempt(hi):
        return done[hi], tried  # the closest it gets: the caller's report says it fell short
    while lo < hi:  # invariant: candidates[hi] meets the target
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid + 1
    return done[hi], tried


def vb_adapter(source: Adapter, vb: VectorBank, where: str | Path) -> Adapter:
    """The VB-LoRA adapter that carries ``source``'s metadata and heads with bank and codes ``vb``."""
    return Adapter(
        modules={},
        carried=dict(source.carried),
        source_format="vblora",
        base_model=source.base_model,
        task_type=source.task_type,
        target_modules=source.target_modules if source.source_format == "peft" else None,
        modules_to_save=source.modules_to_save,
        config={"fan_in_fan_out": source.fan_in_fan_out()},
        source=str(where),
        vector_bank=vb,
    )


def write_compressed(
    source: Adapter,
    vb: VectorBank,
    target: OutputTarget,
    *,
    fit: FitSettings,
    output: OutputSettings,
    stages: FitStages,
    src: str | Path,
    source_path: Path,
    hub_source: HubSource | None = None,
    calibration: CalibrationReport | None = None,
    repo_id: str | None = None,
    probe: Probe | None = None,
    search: tuple[list[dict] | None, float | None] = (None, None),
) -> CompressReport:
    """Write ``vb`` as a PEFT VB-LoRA adapter with its report, verdict and model card; the report describes
    the written files, re-read, not our in-memory copy. With ``probe`` (a base model and held-out text), the
    verdict compares retention too: the written adapter's and the best plain representation's, measured alike."""
    with target.write() as tmp:
        write_vblora(vb_adapter(source, vb, target.out), tmp, full_logits=output.full_logits)
        written = target.read_back(load_adapter, tmp)
        total, modules, zero = measure(source, written)
        vb_bytes, bank_bytes = written.stored_bytes(), vb.bank.numel() * vb.bank.element_size()
        report = CompressReport(
            source=str(src),
            source_format=source.source_format,
            fit=fit,
            output=output,
            total_rel_error=total,
            modules=modules,
            zero_modules=zero,
            bytes=ByteCounts(
                source_stored=source.stored_bytes(),
                source_fp16=source.fp16_bytes(),
                vb=vb_bytes,
                bank=bank_bytes,
                codes=vb_bytes - bank_bytes,
                carried=source.carried_bytes(),
            ),
            svd_baseline=truncation(source.modules.values(), vb_bytes),
            verdict=verdict_on(source, written, vb_bytes, total, probe, str(src)),
            fit_stages=stages,
            hub_source=hub_source,
            calibration=calibration,
            search=search[0],
            search_target=search[1],
        )
        write_json(tmp / REPORT_FILE, report.to_json())
        card = model_card(
            report, base_model=source.base_model, task_type=source.task_type, source_meta=source_metadata(source_path), repo_id=repo_id
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return report


def verdict_on(source: Adapter, written: Adapter, stored: int, rel_error: float | None, probe: Probe | None, src: str) -> Verdict:
    """The verdict on a written VB-LoRA adapter, in function space too when a probe is given."""
    plain, retention = best_plain(source.modules.values(), stored), None
    if probe is not None:
        retention = probe.measure(written.delta_weights()).headline
        if plain is not None:
            plain.retention = probe.measure(plain.deltas(source.modules)).headline
    return judge("this VB-LoRA adapter", source.modules.values(), stored, rel_error, retention, plain, src)


def compress_from_hub(
    ref: str,
    out: str | Path,
    fit: FitSettings | None = None,
    *,
    push_to: str | None = None,
    private: bool = False,
    token: str | None = None,
    **options,
) -> CompressReport:
    """``vbcompress hub``: download the LoRA at ``ref``, run :func:`lora2vb` on it with ``options`` (writing
    the model card), and with ``push_to`` upload the result; ``report.pushed`` then says where."""
    # A bad target or missing write access fails before the long part, not after it.
    dry = options.get("size") is not None and options["size"].dry_run
    url = create_repo(push_to, private=private, token=token) if push_to is not None and not dry else None
    report = lora2vb(ref, out, fit, token=token, repo_id=push_to, **options)
    if push_to is not None and not dry:
        report.pushed = push(out, push_to, token=token, url=url)
    return report
