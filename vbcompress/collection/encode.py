"""Putting adapters into a collection: reading sources, encoding one adapter against a bank, and ``pack``
(one bank fitted jointly to every source)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ..adapter import Adapter
from ..bank.calibrate import Calibration
from ..bank.pipeline import calibration_texts, fit_settings_for, run_fit
from ..bank.shared import calibrate_shared
from ..basemodel import Base
from ..codec.layout import VBCode, VectorBank
from ..errors import SettingError, ShapeError
from ..files import save_tensors
from ..formats import load_adapter
from ..formats.peft_lora import target_modules_for
from ..hub import resolve
from ..linalg import gram_sq_norm
from ..output import claim_output
from ..retention import Probe
from ..settings import CalibrationSettings, FitSettings, OutputSettings, Progress, QualitySettings, SizeSettings, resolve_device
from ..sizing import collection_budget, fit_collection_for_budget
from .hold import Calibrate, Growth, Holding, Judge, choose
from .schema import check_name
from .store import BANK_FILE, CollectionSummary, Entry, Manifest, Store, sha256_of
from .writes import settle, write_adapter, write_manifest


@dataclass
class Source:
    """A source adapter, loaded, with where it came from."""

    name: str
    given: str
    adapter: Adapter
    sha256: str
    path: Path
    hub_source: dict | None = None

    @property
    def rank_cap(self) -> int:
        return max(self.adapter.ranks)


def default_name(given: str, path: Path) -> str:
    """The source's folder or file stem, or the Hub repo (and subfolder) name, as a collection name."""
    stem = path.stem if path.is_file() else path.name
    if not Path(given).exists() and "/" in str(given):
        stem = str(given).split("@")[0].rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-") or "adapter"


def load_source(given: str | Path, name: str | None, token: str | None, format: str | None = None) -> Source:
    """Resolve (Hub ids here, once), read and fingerprint one source adapter."""
    got = resolve(given, "adapter", token=token)
    adapter = load_adapter(got.path, format=format)
    return Source(
        name=check_name(name or default_name(str(given), got.path)),
        given=str(given),
        adapter=adapter,
        sha256=sha256_of(Path(adapter.source)),  # the weights file the reader chose
        path=got.path,
        hub_source=asdict(got.hub) if got.hub else None,
    )


def model_name(base_model: str) -> str:
    """What a base-model reference names, whatever the path or organisation around it: ``gemma3-270m-it``,
    ``google/gemma-3-270m-it`` and ``/content/models/gemma-3-270m-it`` all name ``gemma3270mit``."""
    last = re.split(r"[/\\]", base_model.rstrip("/\\"))[-1]
    return re.sub(r"[^a-z0-9]", "", last.lower())


def check_sources_fit(sources: list[Source], base_model: str | None, shapes: dict[str, tuple[int, int]], allow_mixed_bases: bool) -> None:
    """Every source must be of one base: the same model name where configs name one (compared without the
    path or organisation, see :func:`model_name`), and the same shape per module."""
    for s in sources:
        named = s.adapter.base_model
        if base_model and named and model_name(named) != model_name(base_model) and not allow_mixed_bases:
            raise ShapeError(
                s.path,
                f"adapter {s.name!r} is for base model {named!r}, the collection's is {base_model!r} "
                "(use {setting} to put them in one bank anyway)",
                setting="allow_mixed_bases",
            )
        base_model = base_model or named
        for mname, m in s.adapter.modules.items():
            shape = (m.in_features, m.out_features)
            if shapes.setdefault(mname, shape) != shape:
                raise ShapeError(
                    s.path,
                    f"adapter {s.name!r}: module {mname} is {shape[1]}×{shape[0]} here but "
                    f"{shapes[mname][1]}×{shapes[mname][0]} in another adapter of the collection: not one base",
                )


def adapter_energy(adapter: Adapter) -> float:
    return sum(float(gram_sq_norm(*(t.double() for t in m.folded()))) for m in adapter.modules.values())


@dataclass
class Encoded:
    """One adapter encoded against a bank, as plain tensors and JSON: what a worker hands the driver to write."""

    entry: Entry
    tensors: dict[str, torch.Tensor]  # the codec's tensors and the carried heads
    table: dict  # adapter.json
    vectors: torch.Tensor | None = None  # rows [G, L] to append to the bank (codes name them from `bank_size` on)
    bank_size: int = 0  # the bank's N when this was encoded


def encode_held(source: Source, holding: Holding, added_by: str, floor: str) -> Encoded:
    """The entry, tensors and table of ``source`` held as ``holding`` (errors measured on exactly what is stored)."""
    adapter, chosen = source.adapter, holding.chosen
    peft_view = Adapter(
        modules={},
        source_format=adapter.source_format,
        target_modules=adapter.target_modules,
        config={"fan_in_fan_out": adapter.fan_in_fan_out()},
        source=adapter.source,
    )
    entry = Entry(
        name=source.name,
        source=source.given,
        source_sha256=source.sha256,
        source_format=adapter.source_format,
        base_model=adapter.base_model,
        rank=chosen.rank,
        modules=len(adapter.modules),
        rel_error=chosen.rel_error,
        codes_bytes=sum(t.numel() * t.element_size() for t in holding.tensors.values()),
        carried_bytes=adapter.carried_bytes(),
        source_fp16_bytes=adapter.fp16_bytes(),
        added_by=added_by,
        calibrated=holding.calibrated,
        hub_source=source.hub_source,
        codec=holding.codec,
        bits=chosen.bits,
        source_rank=source.rank_cap,
        retention=chosen.retention,
        floor=floor,
        tried=[asdict(t) for t in holding.tried],
        verdict=holding.verdict.to_json() if holding.verdict else None,
        per_module=chosen.ranks is not None,
        vectors_bytes=holding.vectors.numel() * holding.vectors.element_size() if holding.vectors is not None else 0,
    )
    table = {
        "name": source.name,
        **holding.table,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "modules_to_save": adapter.modules_to_save,
        "target_modules": target_modules_for(peft_view, list(adapter.modules)),
        "module_errors": holding.errors,
    }
    return Encoded(entry=entry, tensors={**holding.tensors, **adapter.carried}, table=table, vectors=holding.vectors)


def write_encoded(root: Path, enc: Encoded, manifest: Manifest) -> Entry:
    return write_adapter(root, enc.entry, enc.tensors, enc.table, manifest)


@dataclass
class Judging:
    """What scores a source against the floor: the quality settings and, with a base model, the model, the
    calibration text (a file, or None for data-free) and the calibration settings."""

    quality: QualitySettings
    model: Base | None = None
    texts: str | os.PathLike | None = None
    calibration: CalibrationSettings | None = None
    prepared: dict[str, Calibration] = field(default_factory=dict)  # by source name: split and targets made once

    def calibration_for(self, source: Source, seed: int) -> Calibration:
        """``source``'s calibration problem on the base (held-out split, batches, teacher targets), made once."""
        if source.name not in self.prepared:
            settings = self.calibration or CalibrationSettings()
            self.model.check(source.adapter)
            teacher = source.adapter.delta_weights()
            inputs, _ = calibration_texts(self.model, self.texts, settings, seed, teacher=teacher)
            self.prepared[source.name] = Calibration(source.adapter, self.model, inputs, settings, seed=seed, teacher=teacher)
        return self.prepared[source.name]


def hold(
    source: Source,
    codes: dict[str, VBCode] | None,
    bank: torch.Tensor | None,
    fit: FitSettings,
    judging: Judging,
    added_by: str,
    progress: Progress | None = None,
    bank_dtype: torch.dtype | None = None,
    trained: bool = False,
) -> Encoded:
    """``source`` held the cheapest way that meets the floor: bank ``codes`` (full rank, sliced and, with a
    base model, calibrated against the frozen bank), codes against the bank grown for it (``bank_dtype``: how
    the collection stores its bank; None: the bank may not grow), or low-rank factors; see :mod:`.hold`.
    ``trained``: the codes were calibrated with the bank already (a calibrated pack) and are held as they are."""
    probe, calibrate_codes, calibration = None, None, None
    if judging.model is not None:
        calibration = judging.calibration_for(source, fit.seed)
        probe = Probe(judging.model, calibration.held, calibration.teacher, calibration.settings.max_length)

        def train(trial: dict[str, VBCode], short: bool) -> dict[str, VBCode]:
            if trained:
                # Trained with the bank, codes sit in its optimum; code_lr steps against the frozen bank jump out of it
                # (ner-r8 rank 8 in the NER trio's calibrated pack: 0.952 as trained, 0.926 after 100 such steps).
                return trial
            # the judge measures the result on the same held-out texts: calibration need not measure it too
            vb = VectorBank(bank=bank, topk=fit.topk, codes=trial)
            return calibration.run(vb, progress, freeze_bank=True, measure=False, warm=short)[0].codes

        calibrate_codes = Calibrate(train, warm=not trained and calibration.settings.warm_steps > 0)

    growth = None
    if bank_dtype is not None and codes is not None and judging.quality.grow > 0:

        def grow(rank: int, vectors: int) -> tuple[dict[str, VBCode], torch.Tensor]:
            factors = {m: mod.balanced() for m, mod in source.adapter.modules.items()}
            result = run_fit(factors, replace(shared_bank(fit), rank=rank), progress, bank=bank, grow=vectors)
            got, grown = result.codes, result.bank
            if calibration is not None:  # the new rows train with the codes; the bank's own rows are held
                vb = calibration.run(VectorBank(grown, fit.topk, got), progress, measure=False, fixed_rows=bank.shape[0])[0]
                got, grown = vb.codes, vb.bank
            return got, grown[bank.shape[0] :].to(bank_dtype)

        size = torch.empty(0, dtype=bank_dtype).element_size() * bank.shape[1]
        growth = Growth(grow, size, judging.quality.grow)

    judge = Judge(source.adapter, judging.quality, probe)
    offer = (bank, fit.topk, codes) if codes is not None else None
    holding = choose(source.name, source.adapter, judge, judging.quality, offer, calibrate_codes, growth)
    judging.prepared.pop(source.name, None)  # its teacher and targets: tens of MB each, a batch holds one at a time
    encoded = encode_held(source, holding, added_by, judge.describe())
    encoded.bank_size = bank.shape[0] if bank is not None else 0
    return encoded


def encode_one(
    source: Source,
    fit: FitSettings,
    bank: torch.Tensor,
    judging: Judging,
    progress: Progress | None = None,
    bank_dtype: torch.dtype | None = None,
) -> Encoded:
    """``source`` added to a collection with the frozen ``bank``: codes fitted at its full rank (capped by the
    collection's), then held the cheapest way that meets the floor (``bank_dtype`` given: the bank may grow)."""
    run = fit_settings_for([source.adapter], replace(fit, rank=min(fit.rank or source.rank_cap, source.rank_cap)))
    codes = None
    if judging.quality.hold != "lowrank":
        factors = {m: mod.balanced() for m, mod in source.adapter.modules.items()}  # the floor's ladder reuses them
        kind, floor = judging.quality.floor(judging.model is not None)
        # against a ΔW floor, codes that miss it by more than refinement can gain are not refined (a 7B add: 5 s)
        within = floor if kind == "error" else None
        codes = run_fit(factors, run, progress, bank=bank, refine_within=within).codes
    return hold(source, codes, bank, run, judging, "add", progress, bank_dtype)


def pack(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    fit: FitSettings | None = None,
    *,
    output: OutputSettings | None = None,
    names: list[str] | None = None,
    quality: QualitySettings | None = None,
    base: str | os.PathLike | None = None,
    calibration: CalibrationSettings | None = None,
    texts: str | os.PathLike | None = None,
    allow_mixed_bases: bool = False,
    format: str | None = None,
    overwrite: bool = False,
    token: str | None = None,
    progress: Progress | None = None,
    size: SizeSettings | None = None,
) -> CollectionSummary:
    """Fit one bank jointly to every source and write a collection to ``out``; returns its summary.

    Each adapter weighs equally in the objective (its squared ΔW error over its own ‖ΔW‖², so a large adapter
    cannot swallow the bank). Sources are any readable adapters, local or Hub ids, of one base. Each is then
    held the cheapest way that meets ``quality``'s floor (bank codes of its top directions, or low-rank
    factors); with ``base``, the floor is retention on held-out text and bank codes are calibrated on it.
    A source that nothing meets fails the pack, before anything is written.

    ``size`` (``max_bytes`` or ``target_ratio`` of all sources' fp16 bytes) chooses the largest N whose bank
    plus every adapter's bank codes fit; adapters the floor holds as factors instead may end above or below it
    (the summary carries the budget, and the CLI says when the total passed it).
    """
    fit, output, quality, size = fit or FitSettings(), output or OutputSettings(), quality or QualitySettings(), size or SizeSettings()
    output.check()
    size.check()
    for setting in ("dry_run", "min_kl_retention"):
        if getattr(size, setting):
            raise SettingError(setting, "{setting} applies to lora2vb; a collection's floor is --max-error or --min-kl-retention")
    quality.check(base is not None)
    if texts is not None and base is None:
        raise SettingError("texts", "calibration text ({setting}) needs a base model", where=texts)
    if not sources:
        raise SettingError("sources", "name at least one source adapter")
    if names is not None and len(names) != len(sources):
        raise SettingError("names", f"{len(names)} names for {len(sources)} sources")
    loaded = [load_source(s, names[i] if names else None, token, format) for i, s in enumerate(sources)]
    dupes = sorted({s.name for s in loaded if [t.name for t in loaded].count(s.name) > 1})
    if dupes:
        raise SettingError("names", f"two sources would both be named {dupes[0]!r}: name them (names=...)")
    check_sources_fit(loaded, None, {}, allow_mixed_bases)
    adapters = [s.adapter for s in loaded]
    if collection_budget(adapters, size) is not None:
        chosen = fit_collection_for_budget(adapters, fit_settings_for(adapters, fit), output, size)
        fit = replace(fit, num_vectors=chosen.num_vectors)  # the rest stays as given: joint_fit resolves it
    base_path = resolve(base, "base", token=token).path if base is not None else None
    with claim_output(out, overwrite, inputs=tuple(s.path for s in loaded) + (base_path, texts)) as target:  # before the fit
        judging = Judging(quality, None, texts, calibration)
        if base_path is not None:
            (calibration or CalibrationSettings()).check()
            judging.model = Base(base_path, loaded[0].adapter, device=resolve_device(fit.device))
        return replace(_pack(loaded, target, fit, output, judging, progress), budget=collection_budget(adapters, size))


# A bank shared by a collection keeps the gentler refine and the full alternation of the first defaults: with
# FitSettings' single-adapter ones the NER trio's joint bank (N=256) reached lower ΔW error but kept less KL, weight-
# only (ner-quality-r16 0.258 -> 0.167) and after 100 steps of shared calibration (0.810 -> 0.702 at rank 1).
SHARED_BANK = dict(refine_lr=3e-3, stop_gain=0.0)


def shared_bank(fit: FitSettings) -> FitSettings:
    """``fit`` with :data:`SHARED_BANK` wherever it holds FitSettings' defaults (a value a caller chose stays)."""
    defaults = {f.name: f.default for f in fields(FitSettings)}
    return replace(fit, **{k: v for k, v in SHARED_BANK.items() if getattr(fit, k) == defaults[k]})


def joint_fit(
    adapters: list[Adapter], fit: FitSettings, bank_dtype: str = "float32", progress: Progress | None = None
) -> tuple[torch.Tensor, list[dict[str, VBCode]], FitSettings]:
    """One bank fitted to every module of every adapter, each adapter weighing the same (its squared ΔW error
    over its own ‖ΔW‖²): (bank ``[N, L]`` as stored, each adapter's full-rank codes, the settings as run)."""
    cap = fit.rank  # the user's cap: each adapter keeps min(cap, its own rank), now and when added later
    run = shared_bank(fit_settings_for(adapters, fit))
    factors, ranks, scales = {}, {}, {}
    for i, adapter in enumerate(adapters):
        energy, top = adapter_energy(adapter), max(adapter.ranks)
        for mname, m in adapter.modules.items():
            key = f"{i}:{mname}"
            factors[key] = m.folded()
            ranks[key] = min(cap or top, top)
            scales[key] = 1.0 / energy if energy > 0 else 1.0
    result = run_fit(factors, run, progress, ranks=ranks, scales=scales)
    codes = [{mname: result.codes[f"{i}:{mname}"] for mname in adapter.modules} for i, adapter in enumerate(adapters)]
    return result.bank.to(getattr(torch, bank_dtype)), codes, run


def _pack(loaded: list[Source], target, fit: FitSettings, output: OutputSettings, judging: Judging, progress) -> CollectionSummary:
    cap = fit.rank
    bank, codes, fit = joint_fit([s.adapter for s in loaded], fit, output.bank_dtype, progress)
    settings = {**asdict(replace(fit, rank=cap)), "bank_dtype": output.bank_dtype}
    if judging.model is not None and (judging.calibration or CalibrationSettings()).steps > 0:
        # a calibrated pack: the bank (and every adapter's codes) trained on what the adapters do, before each is held
        calibrations = [judging.calibration_for(s, fit.seed) for s in loaded]
        trained, codes, _ = calibrate_shared(calibrations, bank.float(), codes, fit.topk, progress)
        bank = trained.to(bank.dtype)
        settings["calibrated_bank_steps"] = calibrations[0].settings.steps
    # every source held (or refused) before anything is written
    trained = "calibrated_bank_steps" in settings
    encoded = [hold(s, c, bank.float(), fit, judging, "pack", progress, trained=trained) for s, c in zip(loaded, codes)]
    with target.write() as tmp:
        save_tensors({"bank": bank.contiguous()}, tmp / BANK_FILE)
        base_model = next((s.adapter.base_model for s in loaded if s.adapter.base_model), None)
        manifest = Manifest(settings=settings, bank_sha256=sha256_of(tmp / BANK_FILE), base_model=base_model)
        for enc in encoded:
            write_encoded(tmp, enc, manifest)
        write_manifest(tmp, manifest)
        settle(tmp, manifest.adapters)
    return Store(target.out).summary()
