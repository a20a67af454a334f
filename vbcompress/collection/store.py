"""A collection on disk: its format, the manifest, and reading adapters back (writing: :mod:`.writes`).

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

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapter import Adapter
from ..codec.bank import BANK
from ..codec.base import Codec
from ..codec.layout import VectorBank
from ..codec.lowrank import BITS
from ..codec.registry import CODECS, codec_named
from ..errors import FormatError, SettingError, listed
from ..files import COLLECTION_LOCK, MANIFEST_FILE, read_json
from ..files import check_safetensors as check_tensor_file
from ..settings import FitSettings
from ..units import held_name
from ..version import __version__
from .schema import HEX64, NAME, Fields, check_settings, check_table, entry_fields

FORMAT = "vbcompress-collection"
FORMAT_VERSION = 2  # 2: a grown bank, in a file named by its hash (bank_file); 1: bank.safetensors
MANIFEST = MANIFEST_FILE
BANK_FILE = "bank.safetensors"
BANK_NAME = re.compile(r"bank(-[0-9a-f]{16})?\.safetensors")  # what a bank file of ours is called
ADAPTERS = "adapters"
CODES_FILE = "codes.safetensors"
ADAPTER_FILE = "adapter.json"
LOCK_FILE = COLLECTION_LOCK
TMP_PREFIX = ".tmp-"
FAILURES_FILE = "failures.json"
JOURNAL_PREFIX = TMP_PREFIX + "pending-"  # + NAME: an adapter folder being added or removed, until the manifest says so


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
    codec: str = "bank"  # how it is held: "bank" codes, or "lowrank" factors at `bits`
    bits: int | None = None
    source_rank: int | None = None  # the source's rank; `rank` is what was kept (top directions)
    retention: float | None = None  # held-out KL retention (causal LMs) or effect retention (encoders), with a base
    floor: str | None = None  # what it was held to, e.g. "ΔW error ≤ 0.5"
    tried: list = field(default_factory=list)  # the representations tried: codec, rank, bits, bytes, what each kept
    verdict: dict | None = None  # against the best plain representation in no more bytes (vbcompress.verdict)
    codes_sha256: str | None = None  # of codes.safetensors and adapter.json as written: checked on every read
    table_sha256: str | None = None
    per_module: bool = False  # low-rank factors at ranks chosen per module (adapter.json lists them); `rank` is the largest
    bank_rows: list[int] | None = None  # [start, stop): the bank vectors this adapter brought (a grown bank)
    vectors_bytes: int = 0  # their bytes in the bank

    @property
    def marginal_bytes(self) -> int:
        """What this adapter added to the collection: its codes, its heads, and the bank vectors it brought."""
        return self.codes_bytes + self.carried_bytes + self.vectors_bytes

    @property
    def held_as(self) -> str:
        """``bank codes r=2`` / ``int4 factors r=1``: how the collection holds it, in words."""
        rows = self.bank_rows
        return held_name(self.codec, self.rank, self.bits, self.per_module, rows[1] - rows[0] if rows else 0)


@dataclass
class Manifest:
    """``collection.json``: what the collection holds and how its bank was made."""

    settings: dict  # FitSettings as run (vector length, rank cap, device resolved) + bank_dtype; num_vectors as grown
    bank_sha256: str
    adapters: dict[str, Entry] = field(default_factory=dict)
    base_model: str | None = None
    format: str = FORMAT
    format_version: int = 1
    vbcompress_version: str = __version__
    bank_file: str = BANK_FILE

    def to_json(self) -> dict:
        out = asdict(self)
        out["adapters"] = {name: asdict(e) for name, e in self.adapters.items()}
        # A reader of version 1 knows only bank.safetensors: a grown bank says it needs a newer one.
        out["format_version"] = 1 if self.bank_file == BANK_FILE else 2
        if self.bank_file == BANK_FILE:
            del out["bank_file"]
        return out

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if not path.is_file():
            raise FormatError(root, f"not a vbcompress collection (no {MANIFEST})")
        data = read_json(path)
        if data.get("format") != FORMAT:
            raise FormatError(path, f"not a vbcompress collection manifest (format {data.get('format')!r})")
        if (
            not isinstance(data.get("format_version"), int)
            or isinstance(data["format_version"], bool)
            or data["format_version"] > FORMAT_VERSION
        ):
            raise FormatError(
                path, f"collection format version {data.get('format_version')!r} is newer than this vbcompress reads ({FORMAT_VERSION})"
            )
        f = Fields(data, path, "manifest")
        settings = check_settings(f.obj("settings"), path)
        adapters = {}
        for name, raw in f.obj("adapters").items():
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise FormatError(path, f"manifest names an adapter {name!r}: not a valid adapter name")
            adapters[name] = Entry(**entry_fields(name, raw, path, CODECS, BITS, settings["num_vectors"]))
        return cls(
            settings=settings,
            bank_file=f.str("bank_file", optional=True, pattern=BANK_NAME) or BANK_FILE,
            bank_sha256=f.str("bank_sha256", pattern=HEX64),
            adapters=adapters,
            base_model=f.str("base_model", optional=True),
            format_version=data["format_version"],
            vbcompress_version=str(data.get("vbcompress_version")),
        )

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
    unlisted: list[str] = field(default_factory=list)  # folders under adapters/ the manifest does not name
    budget: int | None = None  # pack's byte budget, when one chose N

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
            path = self.inside(self.path / self.manifest.bank_file)
            if not path.is_file() or sha256_of(path) != self.manifest.bank_sha256:
                raise FormatError(path, "missing, or not the bank this collection's codes were fitted to (hash differs)")
            check_tensor_file(path)
            with safe_open(str(path), "pt") as f:
                if list(f.keys()) != ["bank"]:
                    raise FormatError(path, "a bank file holds one tensor, 'bank'")
                bank = f.get_tensor("bank")
            st = self.manifest.settings
            if bank.dtype not in (torch.float32, torch.float16) or list(bank.shape) != [st["num_vectors"], st["vector_length"]]:
                raise FormatError(
                    path, f"bank is {bank.dtype} {list(bank.shape)}, the manifest says [{st['num_vectors']}, {st['vector_length']}]"
                )
            if not torch.isfinite(bank).all():
                raise FormatError(path, "bank holds NaN or Inf")
            self._bank = bank
        return self._bank

    def forget_bank(self) -> None:
        """Drop the bank read so far: the next :attr:`bank` reads the file the manifest names now (a grown bank)."""
        self._bank = None

    @property
    def bank_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()

    @property
    def total_bytes(self) -> int:
        """Bank (grown vectors included) plus every adapter's codes and carried tensors (tensor bytes, no file
        headers)."""
        return self.bank_bytes + sum(e.marginal_bytes - e.vectors_bytes for e in self.entries.values())

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and p.name != LOCK_FILE)

    def inside(self, path: Path) -> Path:
        """``path``, proven to lie inside the collection once every symbolic link is followed."""
        root = os.path.realpath(self.path)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise FormatError(path, "leads outside the collection (a symbolic link?): refused")
        return path

    def files(self, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Adapter ``name``'s table (``adapter.json``) and every tensor of its codes file, as stored, checked
        against the hashes the manifest holds for them."""
        entry = self.entry(name)
        folder = self.inside(self.path / ADAPTERS / entry.name)
        table_path, codes_path = self.inside(folder / ADAPTER_FILE), self.inside(folder / CODES_FILE)
        for path, digest in ((table_path, entry.table_sha256), (codes_path, entry.codes_sha256)):
            if digest is not None and (not path.is_file() or sha256_of(path) != digest):
                raise FormatError(path, "missing, or not the file this collection wrote (hash differs)")
        meta = check_table(read_json(table_path), table_path, entry.codec, entry.name)
        check_tensor_file(codes_path)
        try:
            with safe_open(str(codes_path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise FormatError(codes_path, f"cannot read the adapter's codes ({e.__class__.__name__})") from None
        return meta, tensors

    def unlisted(self) -> list[str]:
        """Folders under ``adapters/`` that the manifest does not name: never touched, only reported."""
        folder = self.path / ADAPTERS
        if not folder.is_dir() or folder.is_symlink():
            return []
        return sorted(p.name for p in folder.iterdir() if p.name not in self.manifest.adapters)

    def held(self, name: str) -> tuple[dict, Codec, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(table, codec, the codec's tensors, carried tensors) of adapter ``name``, checked, nothing decoded."""
        meta, tensors = self.files(name)
        folder = self.path / ADAPTERS / name
        codec = codec_named(meta.get("codec", BANK.name), folder / ADAPTER_FILE)
        codec.check(tensors, meta, folder / CODES_FILE, tuple(self.bank.shape), self.topk)
        own = {k: tensors.pop(k) for k in list(tensors) if codec.owns(k)}
        return meta, codec, own, tensors

    def codes(self, name: str) -> tuple[dict, VectorBank, dict[str, torch.Tensor]]:
        """(table, the shared bank with ``name``'s codes, carried tensors) of a bank-coded adapter, undecoded."""
        meta, codec, own, carried = self.held(name)
        return meta, VectorBank(bank=self.bank, topk=self.topk, codes=BANK.codes(own, meta, self.bank.shape[1])), carried

    def adapter(self, name: str) -> Adapter:
        """Adapter ``name`` decoded (a bank-coded one keeps its :class:`VectorBank`, decoded as PEFT would)."""
        meta, codec, own, carried = self.held(name)
        if codec is not BANK:
            return self._as_adapter(name, meta, codec.decode(own, meta, self.bank, self.topk), carried, None)
        codes = BANK.codes(own, meta, self.bank.shape[1])  # read once: the modules and the VectorBank share them
        vb = VectorBank(bank=self.bank, topk=self.topk, codes=codes)
        return self._as_adapter(name, meta, BANK.modules_of(codes, meta, self.bank), carried, vb)

    def _as_adapter(self, name: str, meta: dict, modules: dict, carried: dict, vb: VectorBank | None) -> Adapter:
        return Adapter(
            modules=modules,
            carried=carried,
            source_format="vblora" if vb is not None else "peft",
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
            unlisted=self.unlisted(),
        )


def is_collection(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()
