"""Putting adapters into a collection: reading sources, encoding one adapter against a bank, and ``pack``
(one bank fitted jointly to every source)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..adapter import Adapter
from ..bank.calibrate import calibrate
from ..bank.pipeline import calibration_texts, fit_settings_for, run_fit
from ..codec.bank import BANK
from ..codec.layout import VBCode, VectorBank
from ..errors import SettingError, ShapeError
from ..files import save_tensors
from ..formats import load_adapter
from ..formats.peft_lora import target_modules_for
from ..hub import resolve
from ..linalg import gram_sq_norm
from ..metrics import measure
from ..output import claim_output
from ..settings import FitSettings, OutputSettings, Progress
from .store import BANK_FILE, CollectionSummary, Entry, Manifest, Store, check_name, sha256_of, write_adapter, write_manifest


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


def check_sources_fit(sources: list[Source], base_model: str | None, shapes: dict[str, tuple[int, int]], allow_mixed_bases: bool) -> None:
    """Every source must be of one base: same ``base_model`` where configs name one, same shape per module."""
    for s in sources:
        named = s.adapter.base_model
        if base_model and named and named != base_model and not allow_mixed_bases:
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


def encode_stored(
    source: Source, bank: torch.Tensor, codes: dict[str, VBCode], topk: int, added_by: str, calibrated: bool = False
) -> Encoded:
    """Lay ``codes`` out as a collection stores them and measure the ΔW error of exactly that."""
    adapter = source.adapter
    own = BANK.hold(codes, topk, bank.shape[0])
    rank = next(iter(codes.values())).rank
    table = {
        "name": source.name,
        "codec": BANK.name,
        "rank": rank,
        "fan_in_fan_out": adapter.fan_in_fan_out(),
        "modules": [[mname, m.in_features, m.out_features] for mname, m in adapter.modules.items()],
    }
    stored = Adapter(modules=BANK.decode(own, table, bank, topk), source=source.given)
    total, errors, _ = measure(adapter, stored)
    vb_view = Adapter(
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
        rank=rank,
        modules=len(codes),
        rel_error=total,
        codes_bytes=BANK.stored_bytes(own),
        carried_bytes=adapter.carried_bytes(),
        source_fp16_bytes=adapter.fp16_bytes(),
        added_by=added_by,
        calibrated=calibrated,
        hub_source=source.hub_source,
    )
    table.update(
        base_model=adapter.base_model,
        task_type=adapter.task_type,
        modules_to_save=adapter.modules_to_save,
        target_modules=target_modules_for(vb_view, list(adapter.modules)),
        module_errors={n: asdict(e) for n, e in errors.items()},
    )
    return Encoded(entry=entry, tensors={**own, **adapter.carried}, table=table)


def write_encoded(root: Path, enc: Encoded, manifest: Manifest) -> Entry:
    return write_adapter(root, enc.entry, enc.tensors, enc.table, manifest)


def encode_one(
    source: Source, fit: FitSettings, bank: torch.Tensor, progress: Progress | None = None, calibrate_with: tuple | None = None
) -> Encoded:
    """Codes for ``source`` against the frozen ``bank`` (weight fit, then calibration on a base model when
    ``calibrate_with`` = (base, texts, settings) is given)."""
    run = fit_settings_for([source.adapter], replace(fit, rank=min(fit.rank or source.rank_cap, source.rank_cap)))
    factors = {m: mod.folded() for m, mod in source.adapter.modules.items()}
    codes = run_fit(factors, run, progress, bank=bank).codes
    if calibrate_with is not None:
        model, texts, settings = calibrate_with
        model.check(source.adapter)
        inputs, _ = calibration_texts(model, texts, settings, run.seed, teacher=source.adapter.delta_weights())
        vb, _ = calibrate(
            source.adapter,
            VectorBank(bank=bank, topk=run.topk, codes=codes),
            model,
            inputs,
            settings,
            seed=run.seed,
            progress=progress,
            freeze_bank=True,
        )
        codes = vb.codes
    return encode_stored(source, bank, codes, run.topk, "add", calibrate_with is not None)


def pack(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    fit: FitSettings | None = None,
    *,
    output: OutputSettings | None = None,
    names: list[str] | None = None,
    allow_mixed_bases: bool = False,
    format: str | None = None,
    overwrite: bool = False,
    token: str | None = None,
    progress: Progress | None = None,
) -> CollectionSummary:
    """Fit one bank jointly to every source and write a collection to ``out``; returns its summary.

    Each adapter weighs equally in the objective (its squared ΔW error over its own ‖ΔW‖², so a large adapter
    cannot swallow the bank). Sources are any readable adapters, local or Hub ids, of one base.
    """
    fit, output = fit or FitSettings(), output or OutputSettings()
    output.check()
    if not sources:
        raise SettingError("sources", "name at least one source adapter")
    if names is not None and len(names) != len(sources):
        raise SettingError("names", f"{len(names)} names for {len(sources)} sources")
    loaded = [load_source(s, names[i] if names else None, token, format) for i, s in enumerate(sources)]
    dupes = sorted({s.name for s in loaded if [t.name for t in loaded].count(s.name) > 1})
    if dupes:
        raise SettingError("names", f"two sources would both be named {dupes[0]!r}: name them (names=...)")
    check_sources_fit(loaded, None, {}, allow_mixed_bases)
    with claim_output(out, overwrite, inputs=tuple(s.path for s in loaded)) as target:  # before the fit
        return _pack(loaded, target, fit, output, progress)


def _pack(loaded: list[Source], target, fit: FitSettings, output: OutputSettings, progress) -> CollectionSummary:
    cap = fit.rank  # the user's cap: each adapter keeps min(cap, its own rank), now and when added later
    fit = fit_settings_for([s.adapter for s in loaded], fit)
    factors, ranks, scales = {}, {}, {}
    for i, s in enumerate(loaded):
        energy = adapter_energy(s.adapter)
        for mname, m in s.adapter.modules.items():
            key = f"{i}:{mname}"
            factors[key] = m.folded()
            ranks[key] = min(cap or s.rank_cap, s.rank_cap)
            scales[key] = 1.0 / energy if energy > 0 else 1.0
    result = run_fit(factors, fit, progress, ranks=ranks, scales=scales)
    bank = result.bank.to(getattr(torch, output.bank_dtype))
    settings = {**asdict(replace(fit, rank=cap)), "bank_dtype": output.bank_dtype}
    with target.write() as tmp:
        save_tensors({"bank": bank.contiguous()}, tmp / BANK_FILE)
        base_model = next((s.adapter.base_model for s in loaded if s.adapter.base_model), None)
        manifest = Manifest(settings=settings, bank_sha256=sha256_of(tmp / BANK_FILE), base_model=base_model)
        for i, s in enumerate(loaded):
            codes = {mname: result.codes[f"{i}:{mname}"] for mname in s.adapter.modules}
            write_encoded(tmp, encode_stored(s, bank.float(), codes, fit.topk, "pack"), manifest)
        write_manifest(tmp, manifest)
    return Store(target.out).summary()
