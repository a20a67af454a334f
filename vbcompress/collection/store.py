"""A collection on disk: its format, the manifest, reading adapters back, and the write primitives.

On disk a collection is a directory a person can read::

    collection.json                  manifest: format version, settings, bank hash, one entry per adapter
    bank.safetensors                 "bank": [N, L]
    adapters/NAME/codes.safetensors  the codec's tensors (bank codec: "indices" [S, k], "weights" [S, k-1]
                                     float16) and the adapter's carried tensors (heads) under their own keys
    adapters/NAME/adapter.json       module table (name, in, out), rank, the PEFT config it unpacks with,
                                     and per-module ΔW errors

The manifest is the single source of truth. Writers hold an exclusive lock, write new files first and
replace the manifest last (write to a temp file, then rename), so a crash or kill at any moment leaves the
collection as it was; files that no manifest names (from a killed run) are removed by the next writer.

Reading a collection needs nothing above this module: no Hub, no base model, no fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapter import Adapter
from ..codec.bank import BANK
from ..codec.base import Codec
from ..codec.layout import VectorBank
from ..codec.registry import codec_named
from ..errors import FormatError, OutputError, SettingError, listed
from ..files import MANIFEST_FILE, read_json, replace_json, save_tensors, write_json
from ..output import exclusive_lock
from ..settings import FitSettings
from ..version import __version__

FORMAT = "vbcompress-collection"
FORMAT_VERSION = 1
MANIFEST = MANIFEST_FILE
BANK_FILE = "bank.safetensors"
ADAPTERS = "adapters"
CODES_FILE = "codes.safetensors"
ADAPTER_FILE = "adapter.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
FAILURES_FILE = "failures.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """``name`` if it can name an adapter folder: 1–128 letters, digits, '.', '_' or '-', starting with a
    letter or digit (so no separators, no '..', no control characters)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SettingError("name", f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            raise FormatError(
                path, f"collection format version {data.get('format_version')!r} is newer than this vbcompress reads ({FORMAT_VERSION})"
            )
        try:
            known = {f.name for f in fields(Entry)}
            adapters = {name: Entry(**{k: v for k, v in e.items() if k in known}) for name, e in data["adapters"].items()}
            return cls(
                settings=dict(data["settings"]),
                bank_sha256=str(data["bank_sha256"]),
                adapters=adapters,
                base_model=data.get("base_model"),
                format_version=data["format_version"],
                vbcompress_version=str(data.get("vbcompress_version")),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise FormatError(path, f"broken collection manifest ({e.__class__.__name__}: {e})") from None

    def fit(self) -> FitSettings:
        known = {f.name for f in fields(FitSettings)}
        return FitSettings(**{k: v for k, v in self.settings.items() if k in known})


@dataclass
class CollectionSummary:
    """What a collection holds, in totals and per adapter: what ``inspect COLLECTION`` and ``pack`` report."""

    collection: str
    format_version: int
    base_model: str | None
    settings: dict
    bank_bytes: int
    total_bytes: int
    disk_bytes: int
    sources_fp16_bytes: int
    entries: dict[str, Entry]

    @property
    def ratio_vs_sources_fp16(self) -> float | None:
        return self.total_bytes / self.sources_fp16_bytes if self.sources_fp16_bytes else None

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "entries"}
        out["ratio_vs_sources_fp16"] = self.ratio_vs_sources_fp16
        out["adapters"] = {name: {**asdict(e), "marginal_bytes": e.marginal_bytes} for name, e in self.entries.items()}
        return out


class Store:
    """A collection on disk, read-only: ``names``, ``entries``, ``bank``; ``codes(name)`` reads one
    adapter's codes, ``adapter(name)`` decodes it."""

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

    @property
    def topk(self) -> int:
        return int(self.manifest.settings["topk"])

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

    def files(self, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Adapter ``name``'s table (``adapter.json``) and every tensor of its codes file, as stored."""
        folder = self.path / ADAPTERS / self.entry(name).name
        meta = read_json(folder / ADAPTER_FILE)
        try:
            with safe_open(str(folder / CODES_FILE), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise FormatError(folder / CODES_FILE, f"cannot read the adapter's codes ({e.__class__.__name__})") from None
        return meta, tensors

    def held(self, name: str) -> tuple[dict, Codec, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(table, codec, the codec's tensors, carried tensors) of adapter ``name``, checked, nothing decoded."""
        meta, tensors = self.files(name)
        folder = self.path / ADAPTERS / name
        codec = codec_named(meta.get("codec", BANK.name), folder / ADAPTER_FILE)
        codec.check(tensors, meta, folder / CODES_FILE, tuple(self.bank.shape), self.topk)
        own = {k: tensors.pop(k) for k in codec.tensor_names()}
        return meta, codec, own, tensors

    def codes(self, name: str) -> tuple[dict, VectorBank, dict[str, torch.Tensor]]:
        """(table, the shared bank with ``name``'s codes, carried tensors) of a bank-coded adapter, undecoded."""
        meta, codec, own, carried = self.held(name)
        return meta, VectorBank(bank=self.bank, topk=self.topk, codes=BANK.codes(own, meta, self.bank.shape[1])), carried

    def adapter(self, name: str) -> Adapter:
        """Adapter ``name`` decoded (a bank-coded one keeps its :class:`VectorBank`, decoded as PEFT would)."""
        meta, codec, own, carried = self.held(name)
        modules = codec.decode(own, meta, self.bank, self.topk)
        vb = VectorBank(bank=self.bank, topk=self.topk, codes=BANK.codes(own, meta, self.bank.shape[1])) if codec is BANK else None
        return self._as_adapter(name, meta, modules, carried, vb)

    def _as_adapter(self, name: str, meta: dict, modules: dict, carried: dict, vb: VectorBank | None) -> Adapter:
        return Adapter(
            modules=modules,
            carried=carried,
            source_format="vblora",
            base_model=meta.get("base_model"),
            task_type=meta.get("task_type"),
            target_modules=meta.get("target_modules"),
            modules_to_save=meta.get("modules_to_save"),
            config={"fan_in_fan_out": bool(meta["fan_in_fan_out"])},
            source=str(self.path / ADAPTERS / name),
            vector_bank=vb,
        )

    def summary(self) -> CollectionSummary:
        return CollectionSummary(
            collection=str(self.path),
            format_version=self.manifest.format_version,
            base_model=self.manifest.base_model,
            settings=self.manifest.settings,
            bank_bytes=self.bank_bytes,
            total_bytes=self.total_bytes,
            disk_bytes=self.disk_bytes(),
            sources_fp16_bytes=sum(e.source_fp16_bytes for e in self.entries.values()),
            entries=dict(self.entries),
        )


def is_collection(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


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


def write_adapter(root: Path, entry: Entry, tensors: dict[str, torch.Tensor], table: dict, manifest: Manifest) -> Entry:
    """Write one adapter's folder (staged, then renamed into place) and register ``entry`` in ``manifest``;
    the caller replaces the manifest file afterwards."""
    name = check_name(entry.name)
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "adapter-", dir=root))
    try:
        (staging / name).mkdir()
        save_tensors(tensors, staging / name / CODES_FILE)
        write_json(staging / name / ADAPTER_FILE, table)
        (root / ADAPTERS).mkdir(exist_ok=True)
        os.replace(staging / name, root / ADAPTERS / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.adapters[name] = entry
    return entry


def read_failures(root: Path) -> dict:
    """The collection's failures log: source → {name, error, attempts}; sources that later landed are gone."""
    path = root / FAILURES_FILE
    return read_json(path) if path.is_file() else {}


def write_failures(root: Path, failures: dict) -> None:
    replace_json(root / FAILURES_FILE, failures, prefix=TMP_PREFIX + "failures-")
