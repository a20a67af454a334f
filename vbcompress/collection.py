"""Collections: one vector bank shared by many LoRA adapters of one base (``pack``, ``add``, ``unpack``, ``remove``).

On disk a collection is a directory a person can read::

    collection.json                  manifest: format version, settings, bank hash, one entry per adapter
    bank.safetensors                 "bank": [N, L]
    adapters/NAME/codes.safetensors  "indices": [S, k] (uint8 up to N=256), "weights": [S, k-1] float16,
                                     and the adapter's carried tensors (heads) under their own keys
    adapters/NAME/adapter.json       module table (name, in, out), rank, the PEFT config it unpacks with,
                                     and per-module ΔW errors

Sub-vectors are laid out module by module as PEFT tiles them (A: ``[r, in/L]``, then B: ``[out/L, r]``).
Codes are stored more compactly than PEFT's layout (uint8 indices where they fit, float16 weights rounded
toward zero so they never sum past 1); ``unpack`` writes exactly PEFT's layout, and every error the
manifest states is computed from the codes as stored.

The manifest is the single source of truth. ``add``/``remove`` hold an exclusive lock, write new files
first and replace the manifest last (write to a temp file, then rename), so a crash or kill at any moment
leaves the collection as it was; files that no manifest names (from a killed run) are removed by the next
writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .adapter import Adapter, LoraModule, VBCode, VectorBank
from .bank.calibrate import calibrate
from .basemodel import Base
from .compress import Progress, calibration_texts, fit_settings_for, measure, run_fit
from .errors import FormatError, HubError, OutputError, SettingError, ShapeError, VBCompressError, listed
from .files import CAST_DTYPES, read_json, replace_json, save_tensors, write_json
from .output import atomic_output_dir, claim_output, exclusive_lock
from .formats import load_adapter, weights_in, write_vblora
from .formats.peft_lora import target_modules_for
from .formats.vblora import compact_weights, restored_weights
from .hub import resolve
from .linalg import gram_sq_norm
from .settings import CalibrationSettings, FitSettings, OutputSettings, RankSettings, resolve_device
from .version import __version__

FORMAT = "vbcompress-collection"
FORMAT_VERSION = 1
MANIFEST = "collection.json"
BANK_FILE = "bank.safetensors"
ADAPTERS = "adapters"
CODES_FILE = "codes.safetensors"
ADAPTER_FILE = "adapter.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
ERROR_KINDS = (FormatError, HubError, OutputError, SettingError, ShapeError)  # rebuilt by name after a worker
ENCODING_KNOBS = ("seed", "code_refine_steps", "candidates", "partners", "device")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Entry:
    """One adapter of a collection, as the manifest lists it."""

    name: str
    source: str
    source_sha256: str  # of the source's weights file: the same source is recognised whatever its path
    source_format: str
    base_model: str | None
    rank: int
    modules: int
    rel_error: float | None  # ΔW error of the stored codes against the source, all modules
    codes_bytes: int  # indices + weights as stored: what this adapter adds to the collection
    carried_bytes: int  # heads carried verbatim
    source_fp16_bytes: int  # the source's LoRA factors at fp16
    added_by: str  # "pack" or "add"
    calibrated: bool = False
    hub_source: dict | None = None

    @property
    def marginal_bytes(self) -> int:
        return self.codes_bytes + self.carried_bytes


@dataclass
class Manifest:
    """``collection.json``: what the collection holds and how its bank was made."""

    settings: dict  # FitSettings as run (vector length, rank cap, device resolved) + bank_dtype
    bank_sha256: str
    adapters: dict[str, Entry] = field(default_factory=dict)
    base_model: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    vbcompress_version: str = __version__

    def to_json(self) -> dict:
        out = asdict(self)
        out["adapters"] = {name: asdict(e) for name, e in self.adapters.items()}
        return out

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if not path.is_file():
            raise FormatError(root, f"not a vbcompress collection (no {MANIFEST})")
        data = read_json(path)
        if data.get("format") != FORMAT:
            raise FormatError(path, f"not a vbcompress collection manifest (format {data.get('format')!r})")
        if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
            raise FormatError(path, f"collection format version {data.get('format_version')!r} is newer than this vbcompress reads ({FORMAT_VERSION})")
        try:
            known = {f.name for f in fields(Entry)}
            adapters = {name: Entry(**{k: v for k, v in e.items() if k in known}) for name, e in data["adapters"].items()}
            return cls(settings=dict(data["settings"]), bank_sha256=str(data["bank_sha256"]), adapters=adapters,
                       base_model=data.get("base_model"), format_version=data["format_version"],
                       vbcompress_version=str(data.get("vbcompress_version")))  # fmt: skip
        except (KeyError, TypeError, AttributeError) as e:
            raise FormatError(path, f"broken collection manifest ({e.__class__.__name__}: {e})") from None

    def fit(self) -> FitSettings:
        known = {f.name for f in fields(FitSettings)}
        return FitSettings(**{k: v for k, v in self.settings.items() if k in known})


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


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise SettingError("name", f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def weights_file(path: Path) -> Path:
    return weights_in(path) if path.is_dir() else path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_source(given: str | Path, name: str | None, token: str | None, format: str | None = None) -> Source:
    """Resolve (Hub ids here, once), read and fingerprint one source adapter."""
    got = resolve(given, "adapter", token=token)
    adapter = load_adapter(got.path, format=format)
    return Source(
        name=check_name(name or default_name(str(given), got.path)),
        given=str(given),
        adapter=adapter,
        sha256=sha256_of(weights_file(got.path)),
        path=got.path,
        hub_source=asdict(got.hub) if got.hub else None,
    )


def check_sources_fit(sources: list[Source], base_model: str | None, shapes: dict[str, tuple[int, int]], allow_mixed_bases: bool) -> None:
    """Every source must be of one base: same ``base_model`` where configs name one, same shape per module."""
    for s in sources:
        named = s.adapter.base_model
        if base_model and named and named != base_model and not allow_mixed_bases:
            raise ShapeError(s.path, f"adapter {s.name!r} is for base model {named!r}, the collection's is {base_model!r} "
                             "(use {setting} to put them in one bank anyway)", setting="allow_mixed_bases")  # fmt: skip
        base_model = base_model or named
        for mname, m in s.adapter.modules.items():
            shape = (m.in_features, m.out_features)
            if shapes.setdefault(mname, shape) != shape:
                raise ShapeError(s.path, f"adapter {s.name!r}: module {mname} is {shape[1]}×{shape[0]} here but "
                                 f"{shapes[mname][1]}×{shapes[mname][0]} in another adapter of the collection: not one base")  # fmt: skip


def adapter_energy(adapter: Adapter) -> float:
    return sum(float(gram_sq_norm(*(t.double() for t in m.folded()))) for m in adapter.modules.values())


def stored_code(code: VBCode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices_A, weights_A, indices_B, weights_B) as a collection stores them: sorted compact top-k with
    float16 weights rounded toward zero (so a row never sums past 1)."""
    out = []
    for idx, w in ((code.indices_A, code.weights_A), (code.indices_B, code.weights_B)):
        sorted_idx, stored = compact_weights(w, idx)
        half = stored.half()
        half = torch.where(half.float() > stored, torch.nextafter(half, torch.zeros_like(half)), half)
        out += [sorted_idx, half]
    return tuple(out)


def decoded(indices: torch.Tensor, weights: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[..., k]`` and full mixture weights of stored ``k-1`` float16 weights, as PEFT restores them."""
    k = indices.shape[-1]
    return indices.long().reshape(*shape, k), restored_weights(weights.float()).reshape(*shape, k)


def stored_index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type for indices below ``num_vectors`` (PEFT's own layout moves to int16 one
    vector earlier, at N = 256; unpack writes PEFT's)."""
    return torch.uint8 if num_vectors <= 256 else torch.int16 if num_vectors <= 2**15 else torch.int32


class Collection:
    """A collection on disk. ``names``, ``entries``, ``bank``; ``adapter(name)`` decodes one adapter;
    ``unpack`` writes PEFT adapters; ``load_peft`` loads several into one PEFT model sharing one bank."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(self.path, "no such collection directory")
        self.manifest = Manifest.read(self.path)
        self._bank: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        return list(self.manifest.adapters)

    @property
    def entries(self) -> dict[str, Entry]:
        return self.manifest.adapters

    def entry(self, name: str) -> Entry:
        if name not in self.manifest.adapters:
            raise SettingError("name", f"no adapter {name!r} in the collection (it holds: {listed(self.names)})", where=self.path)
        return self.manifest.adapters[name]

    @property
    def bank(self) -> torch.Tensor:
        """The shared bank ``[N, L]``, checked against the manifest's hash."""
        if self._bank is None:
            path = self.path / BANK_FILE
            if not path.is_file() or sha256_of(path) != self.manifest.bank_sha256:
                raise FormatError(path, "missing, or not the bank this collection's codes were fitted to (hash differs)")
            with safe_open(str(path), "pt") as f:
                self._bank = f.get_tensor("bank")
        return self._bank

    @property
    def bank_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()

    @property
    def total_bytes(self) -> int:
        """Bank plus every adapter's codes and carried tensors (tensor bytes, no file headers)."""
        return self.bank_bytes + sum(e.marginal_bytes for e in self.entries.values())

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and p.name != LOCK_FILE)

    def _files(self, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        folder = self.path / ADAPTERS / self.entry(name).name
        meta = read_json(folder / ADAPTER_FILE)
        try:
            with safe_open(str(folder / CODES_FILE), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise FormatError(folder / CODES_FILE, f"cannot read the adapter's codes ({e.__class__.__name__})") from None
        return meta, tensors

    def adapter(self, name: str) -> Adapter:
        """Adapter ``name`` as a VB-LoRA :class:`Adapter` (bank shared, codes decoded as PEFT would)."""
        meta, tensors = self._files(name)
        vb = VectorBank(bank=self.bank, topk=int(self.manifest.settings["topk"]))
        L, r = vb.vector_length, int(meta["rank"])
        indices, weights = tensors.pop("indices"), tensors.pop("weights")
        modules, start = {}, 0
        for mname, fan_in, fan_out in meta["modules"]:
            na, nb = r * fan_in // L, fan_out // L * r
            ia, wa = decoded(indices[start : start + na], weights[start : start + na], (r, fan_in // L))
            ib, wb = decoded(indices[start + na : start + na + nb], weights[start + na : start + na + nb], (fan_out // L, r))
            vb.codes[mname] = VBCode(ia, wa, ib, wb)
            a, b = vb.decode(mname)
            modules[mname] = LoraModule(name=mname, A=a, B=b, fan_in_fan_out=bool(meta["fan_in_fan_out"]))
            start += na + nb
        if start != indices.shape[0]:
            raise FormatError(self.path / ADAPTERS / name / CODES_FILE, f"codes hold {indices.shape[0]} sub-vectors, the module table {start}")
        return Adapter(
            modules=modules,
            carried=tensors,
            source_format="vblora",
            base_model=meta.get("base_model"),
            task_type=meta.get("task_type"),
            target_modules=meta.get("target_modules"),
            modules_to_save=meta.get("modules_to_save"),
            config={"fan_in_fan_out": bool(meta["fan_in_fan_out"])},
            source=str(self.path / ADAPTERS / name),
            vector_bank=vb,
        )

    def unpack(self, names: list[str], out: str | os.PathLike, *, dense: bool = False, rank: int | str | None = None,
               rank_settings: RankSettings | None = None, overwrite: bool = False, to: str | None = None) -> list[Path]:  # fmt: skip
        """Write each named adapter as a PEFT VB-LoRA adapter (or, ``dense``, a dense LoRA at ``rank`` by the
        rules of ``vb2lora``, written as ``to``: default the source's own family, see
        :func:`~vbcompress.formats.write_dense`). One name: ``out`` is the adapter; several: ``out/NAME`` each."""
        from .dense import truncate
        from .formats import check_dense_format, family_of, write_dense

        if not names:
            raise SettingError("names", "name at least one adapter to unpack", where=self.path)
        for name in names:
            self.entry(name)
        for setting, value in (("rank", rank), ("to", to)):
            if value is not None and not dense:
                raise SettingError(setting, "{setting} applies to a dense unpack only")
        check_dense_format(to)
        written = []
        with atomic_output_dir(out, overwrite=overwrite, inputs=(self.path,)) as tmp:
            for name in names:
                target = tmp if len(names) == 1 else tmp / name
                adapter = self.adapter(name)
                if dense:
                    settings = rank_settings or RankSettings()
                    lora, _ = truncate(adapter, rank, settings)
                    write_dense(replace(lora, target_modules=adapter.target_modules, source_format="peft"), target,
                                to or family_of(self.entry(name).source_format), dtype=CAST_DTYPES[settings.dtype], name=name)  # fmt: skip
                else:
                    write_vblora(replace(adapter, modules={}), target)
                write_json(target / "vbcompress.json", {"collection": str(self.path), **asdict(self.entry(name))})
                written.append(Path(out) if len(names) == 1 else Path(out) / name)
            if len(names) > 1:  # marks the folder as ours (for overwrite) and says what it holds
                write_json(tmp / "vbcompress.json", {"collection": str(self.path), "unpacked": names, "dense": dense})
        return written

    def load_peft(self, model, names: list[str]):
        """Load the named adapters into one PEFT model (switch with ``set_adapter``), holding the bank
        tensor once: every adapter's ``vblora_vector_bank`` entry is the same Parameter."""
        from peft import PeftModel

        if not names:
            raise SettingError("names", "name at least one adapter to load", where=self.path)
        with tempfile.TemporaryDirectory() as tmp:
            paths = self.unpack(names, Path(tmp) / "u")
            peft_model = None
            for name, path in zip(names, paths, strict=True):
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
                else:
                    peft_model.load_adapter(str(path), adapter_name=name)
        banks = peft_model.base_model.vblora_vector_bank
        shared = banks[names[0]]
        for name in names[1:]:
            banks[name] = shared
        peft_model.set_adapter(names[0])
        return peft_model


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Exclusive writer lock on a collection (released by the OS if the process dies)."""
    fd = exclusive_lock(root / LOCK_FILE)
    if fd is None:
        raise OutputError(root, "another vbcompress process is writing this collection (it is locked); try again when it has finished")
    try:
        yield
    finally:
        os.close(fd)


def clean_debris(root: Path, manifest: Manifest) -> list[str]:
    """Remove what a killed writer left: temp files and adapter folders the manifest does not name."""
    removed = []
    for p in list(root.glob(TMP_PREFIX + "*")) + [d for d in (root / ADAPTERS).glob("*") if d.name not in manifest.adapters]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p.name)
    return removed


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (adapters keep the order they were added in)."""
    replace_json(root / MANIFEST, manifest.to_json(), sort_keys=False, prefix=TMP_PREFIX + "manifest-")


@dataclass
class Encoded:
    """One adapter encoded against a bank, as plain tensors and JSON: what a worker hands the driver to write."""

    entry: Entry
    tensors: dict[str, torch.Tensor]  # "indices", "weights" and the carried heads
    table: dict  # adapter.json


def encode_stored(source: Source, bank: torch.Tensor, codes: dict[str, VBCode], topk: int, added_by: str, calibrated: bool = False) -> Encoded:
    """Lay ``codes`` out as a collection stores them and measure the ΔW error of exactly that."""
    adapter, vb = source.adapter, VectorBank(bank=bank, topk=topk)
    parts_idx, parts_w, table, modules = [], [], [], {}
    for mname, m in adapter.modules.items():
        ia, wa, ib, wb = stored_code(codes[mname])
        parts_idx += [ia.reshape(-1, topk), ib.reshape(-1, topk)]
        parts_w += [wa.reshape(-1, topk - 1), wb.reshape(-1, topk - 1)]
        table.append([mname, m.in_features, m.out_features])
        vb.codes[mname] = VBCode(ia, restored_weights(wa.float()), ib, restored_weights(wb.float()))
        a, b = vb.decode(mname)
        modules[mname] = LoraModule(name=mname, A=a, B=b, fan_in_fan_out=m.fan_in_fan_out)
    total, errors, _ = measure(adapter, Adapter(modules=modules, source=source.given, vector_bank=vb))
    indices = torch.cat(parts_idx).to(stored_index_dtype(bank.shape[0]))
    weights = torch.cat(parts_w) if topk > 1 else torch.zeros(indices.shape[0], 0, dtype=torch.float16)
    rank = next(iter(codes.values())).indices_A.shape[0]
    vb_view = Adapter(modules={}, source_format=adapter.source_format, target_modules=adapter.target_modules,
                      config={"fan_in_fan_out": adapter.fan_in_fan_out()}, source=adapter.source)  # fmt: skip
    entry = Entry(
        name=source.name, source=source.given, source_sha256=source.sha256, source_format=adapter.source_format,
        base_model=adapter.base_model, rank=rank, modules=len(codes), rel_error=total,
        codes_bytes=indices.numel() * indices.element_size() + weights.numel() * weights.element_size(),
        carried_bytes=adapter.carried_bytes(), source_fp16_bytes=adapter.fp16_bytes(), added_by=added_by,
        calibrated=calibrated, hub_source=source.hub_source,
    )  # fmt: skip
    meta = {
        "name": source.name, "rank": rank, "fan_in_fan_out": adapter.fan_in_fan_out(), "modules": table,
        "base_model": adapter.base_model, "task_type": adapter.task_type, "modules_to_save": adapter.modules_to_save,
        "target_modules": target_modules_for(vb_view, list(adapter.modules)), "module_errors": {n: asdict(e) for n, e in errors.items()},
    }  # fmt: skip
    return Encoded(entry=entry, tensors={"indices": indices, "weights": weights, **adapter.carried}, table=meta)


def write_encoded(root: Path, enc: Encoded, manifest: Manifest) -> Entry:
    """Write one adapter's folder (staged, then renamed into place) and register it in ``manifest``; the
    caller replaces the manifest file afterwards."""
    name = enc.entry.name
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "adapter-", dir=root))
    try:
        (staging / name).mkdir()
        save_tensors(enc.tensors, staging / name / CODES_FILE)
        write_json(staging / name / ADAPTER_FILE, enc.table)
        (root / ADAPTERS).mkdir(exist_ok=True)
        os.replace(staging / name, root / ADAPTERS / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.adapters[name] = enc.entry
    return enc.entry


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
) -> Collection:
    """Fit one bank jointly to every source and write a collection to ``out``.

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


def _pack(loaded: list[Source], target, fit: FitSettings, output: OutputSettings, progress) -> Collection:
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
    return Collection(target.out)


@dataclass(frozen=True)
class Job:
    """One source of a batch ``add``, and what encoding it needs besides the bank (picklable for workers)."""

    given: str
    name: str | None
    fit: FitSettings  # the bank's settings with the encoding knobs applied; rank = the collection's cap
    base_model: str | None
    known_sha256: str | None  # the weights hash of the entry already added from this same source, if any
    taken: frozenset[str]  # names already in the collection
    allow_mixed_bases: bool = False
    format: str | None = None
    token: str | None = None


@dataclass
class Outcome:
    """What became of one source: ``added`` (with its encoding), ``skipped`` (already in), or ``failed``."""

    given: str
    status: str
    name: str | None = None
    encoded: Encoded | None = None
    where: str | None = None  # the failure, as a VBCompressError's parts (exceptions do not pickle well)
    problem: str | None = None
    setting: str | None = None
    kind: str = "VBCompressError"

    @property
    def error(self) -> VBCompressError | None:
        if self.status != "failed":
            return None
        kind = next((k for k in ERROR_KINDS if k.__name__ == self.kind), VBCompressError)
        error = VBCompressError.__new__(kind)
        VBCompressError.__init__(error, self.where, self.problem, self.setting)
        return error


@dataclass
class Failure:
    """A source that did not land, and why (``error``: one line, in library terms)."""

    source: str
    name: str | None
    error: str
    outcome: Outcome | None = field(default=None, repr=False, compare=False)


@dataclass
class AddReport:
    """What a batch ``add`` did: entries added, sources skipped as already present, sources that failed."""

    added: list[Entry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def to_json(self) -> dict:
        failed = [{"source": f.source, "name": f.name, "error": f.error} for f in self.failed]
        return {"added": [asdict(e) for e in self.added], "skipped": self.skipped, "failed": failed}


def encode(job: Job, bank: torch.Tensor, progress: Progress | None = None, calibrate_with: tuple | None = None) -> Outcome:
    """Fetch, read, check and encode one source against ``bank`` (no writes): runs in the driver, a
    worker process or a Ray task alike, and gives the same bytes for the same seed wherever it runs."""
    try:
        s = load_source(job.given, job.name, job.token, job.format)
        if job.known_sha256 == s.sha256:
            return Outcome(job.given, "skipped", name=s.name)
        if s.name in job.taken:
            hint = (" (its weights changed since it was added; remove it first, or add it under another {setting})"
                    if job.known_sha256 else " (choose another {setting})")
            raise SettingError("name", f"the collection already has an adapter named {s.name!r}{hint}", where=job.given)
        check_sources_fit([s], job.base_model, {}, job.allow_mixed_bases)
        run = fit_settings_for([s.adapter], replace(job.fit, rank=min(job.fit.rank or s.rank_cap, s.rank_cap)))
        factors = {m: mod.folded() for m, mod in s.adapter.modules.items()}
        codes = run_fit(factors, run, progress, bank=bank).codes
        if calibrate_with is not None:
            model, texts, settings = calibrate_with
            model.check(s.adapter)
            inputs, _ = calibration_texts(model, texts, settings, run.seed, teacher=s.adapter.delta_weights())
            vb, _ = calibrate(s.adapter, VectorBank(bank=bank, topk=run.topk, codes=codes), model, inputs, settings,
                              seed=run.seed, progress=progress, freeze_bank=True)  # fmt: skip
            codes = vb.codes
        return Outcome(job.given, "added", name=s.name, encoded=encode_stored(s, bank, codes, run.topk, "add", calibrate_with is not None))
    except VBCompressError as e:
        return Outcome(job.given, "failed", name=job.name, where=e.where, problem=e.problem, setting=e.setting, kind=type(e).__name__)


_WORKER_BANK: torch.Tensor | None = None


def _worker_init(collection: str, threads: int) -> None:
    global _WORKER_BANK
    torch.set_num_threads(threads)
    _WORKER_BANK = Collection(collection).bank.float()


def _worker_encode(job: Job) -> Outcome:
    return encode(job, _WORKER_BANK)


def _run_ray(jobs: list[Job], bank: torch.Tensor, address: str) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError:
        raise SettingError("ray_address", "Ray is not installed: pip install 'vbcompress[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    bank_ref = ray.put(bank)  # in the object store once; every task reads the same copy
    task = ray.remote(num_cpus=1)(encode)
    window = max(2, int(ray.available_resources().get("CPU", 1)) * 2)
    todo, pending = list(jobs), []
    while todo or pending:
        while todo and len(pending) < window:
            pending.append(task.remote(todo.pop(0), bank_ref))
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def _run_pool(jobs: list[Job], collection: Path, workers: int) -> Iterator[Outcome]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(str(collection), threads)) as pool:  # fmt: skip
        futures = [pool.submit(_worker_encode, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


FAILURES_FILE = "failures.json"


def read_failures(root: Path) -> dict:
    """The collection's failures log: source → {name, error, attempts}; sources that later landed are gone."""
    path = root / FAILURES_FILE
    return read_json(path) if path.is_file() else {}


def write_failures(root: Path, failures: dict) -> None:
    replace_json(root / FAILURES_FILE, failures, prefix=TMP_PREFIX + "failures-")


def add(
    collection: str | os.PathLike,
    sources: list[str | os.PathLike],
    *,
    names: list[str] | None = None,
    fit: FitSettings | None = None,
    base: str | os.PathLike | None = None,
    calibration: CalibrationSettings | None = None,
    texts: str | os.PathLike | None = None,
    allow_mixed_bases: bool = False,
    format: str | None = None,
    token: str | None = None,
    keep_going: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    progress: Progress | None = None,
    on_outcome: Callable[[Outcome, AddReport], None] | None = None,
) -> AddReport:
    """Encode each source against the collection's frozen bank and add it (codes only).

    Each source is fetched, read, checked (name, base, vector length) and encoded on its own, then committed
    on its own (its folder, then the manifest), so a failure or kill loses at most the adapters in flight.
    A source already in the collection (same source and same weights hash) is skipped, so re-running a
    batch resumes it. Failures are recorded in ``failures.json`` (and dropped from it once the source
    lands); the first failure is raised unless ``keep_going``. ``workers > 1`` encodes in a local process
    pool, ``ray_address`` (an address, or ``"local"``) as Ray tasks with the bank in the object store once;
    only this process writes. With ``base``, each new adapter's logits are calibrated on its function (in
    this process); the bank stays frozen, since other adapters use it. The bank's settings (N, L, k, rank
    cap) come from the manifest; from ``fit`` only the encoding knobs are taken (``ENCODING_KNOBS``).
    """
    root = Path(collection)
    Collection(root)  # a clear error for a path that is no collection, before taking the lock
    if names is not None and len(names) != len(sources):
        raise SettingError("names", f"{len(names)} names for {len(sources)} sources")
    if not sources:
        raise SettingError("sources", "name at least one source adapter")
    if workers < 1:
        raise SettingError("workers", f"{{setting}} must be at least 1, not {workers}")
    if base is not None and (workers > 1 or ray_address):
        raise SettingError("base", "calibration ({setting}) runs in this process only: drop workers / Ray to calibrate")
    report = AddReport()
    with locked(root):
        coll = Collection(root)
        clean_debris(root, coll.manifest)
        stored = coll.manifest.fit()
        run = replace(stored, **{k: getattr(fit or FitSettings(), k) for k in ENCODING_KNOBS})
        by_source = {e.source: e for e in coll.entries.values()}
        jobs = [Job(given=str(g), name=names[i] if names else None, fit=run, base_model=coll.manifest.base_model,
                    known_sha256=by_source[str(g)].source_sha256 if str(g) in by_source else None,
                    taken=frozenset(coll.names), allow_mixed_bases=allow_mixed_bases, format=format, token=token)
                for i, g in enumerate(sources)]  # fmt: skip
        bank = coll.bank.float()
        failures = read_failures(root)
        calibrate_with = None
        if base is not None:
            settings = calibration or CalibrationSettings()
            settings.check()
            # Load and check the base before any encoding (the first source is read once more for that: small
            # next to calibration, and a bad base stops the batch at once instead of failing every source).
            first = load_source(sources[0], names[0] if names else None, token, format)
            calibrate_with = (Base(resolve(base, "base", token=token).path, first.adapter, device=resolve_device(run.device)), texts, settings)
        if ray_address:
            outcomes = _run_ray(jobs, bank, ray_address)
        elif workers > 1:
            outcomes = _run_pool(jobs, root, workers)
        else:
            outcomes = (encode(job, bank, progress if len(jobs) == 1 else None, calibrate_with) for job in jobs)
        for outcome in outcomes:
            if outcome.status == "added" and outcome.name in coll.manifest.adapters:  # two sources of one name in a batch
                outcome = Outcome(outcome.given, "failed", name=outcome.name, where=outcome.given, setting="name", kind="SettingError",
                                  problem=f"the collection already has an adapter named {outcome.name!r} (choose another {{setting}})")  # fmt: skip
            if outcome.status == "added":
                try:
                    report.added.append(write_encoded(root, outcome.encoded, coll.manifest))
                    write_manifest(root, coll.manifest)
                except BaseException:
                    # Leave the collection exactly as it was: no entry, no folder (a hard kill leaves the
                    # folder, which no manifest names; the next writer removes it).
                    coll.manifest.adapters.pop(outcome.name, None)
                    shutil.rmtree(root / ADAPTERS / outcome.name, ignore_errors=True)
                    raise
                if failures.pop(outcome.given, None) is not None:
                    write_failures(root, failures)
            elif outcome.status == "skipped":
                report.skipped.append(outcome.given)
            else:
                error = outcome.error
                report.failed.append(Failure(outcome.given, outcome.name, str(error), outcome))
                attempts = failures.get(outcome.given, {}).get("attempts", 0) + 1
                failures[outcome.given] = {"name": outcome.name, "error": str(error), "attempts": attempts}
                write_failures(root, failures)
                if not keep_going:
                    raise error
            if on_outcome:
                on_outcome(outcome, report)
    return report


def remove(collection: str | os.PathLike, names: list[str]) -> None:
    """Remove adapters from a collection: the manifest first (atomically), then their folders."""
    root = Path(collection)
    Collection(root)
    with locked(root):
        coll = Collection(root)
        for name in names:
            coll.entry(name)
        for name in names:
            del coll.manifest.adapters[name]
        write_manifest(root, coll.manifest)
        clean_debris(root, coll.manifest)


def is_collection(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def collection_summary(coll: Collection) -> dict:
    """What ``inspect COLLECTION --json`` prints."""
    total, fp16 = coll.total_bytes, sum(e.source_fp16_bytes for e in coll.entries.values())
    return {
        "collection": str(coll.path),
        "format_version": coll.manifest.format_version,
        "base_model": coll.manifest.base_model,
        "settings": coll.manifest.settings,
        "bank_bytes": coll.bank_bytes,
        "total_bytes": total,
        "disk_bytes": coll.disk_bytes(),
        "sources_fp16_bytes": fp16,
        "ratio_vs_sources_fp16": total / fp16 if fp16 else None,
        "adapters": {name: {**asdict(e), "marginal_bytes": e.marginal_bytes} for name, e in coll.entries.items()},
    }

