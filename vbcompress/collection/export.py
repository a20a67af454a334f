"""Getting adapters out of a collection: ``unpack`` to files any loader reads, ``load_peft`` into one PEFT
model with the bank held once."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..card import unpacked_card
from ..dense import truncate
from ..errors import SettingError, requires
from ..files import CAST_DTYPES, REPORT_FILE, write_json
from ..formats import check_dense_format, family_of, write_dense, write_vblora
from ..output import atomic_output_dir
from ..settings import RankSettings
from .compact import compact_adapter
from .materialize import Materialized
from .materialize import materialize as materialize_one
from .store import Store


@dataclass
class UnpackReport:
    """What ``unpack`` wrote: one folder per adapter, VB-LoRA or dense LoRA."""

    collection: str
    names: list[str]
    paths: list[Path]
    dense: bool
    to: str | None = None
    written_as: list[str] = field(default_factory=list)  # per name: "VB-LoRA", or "dense LoRA" (asked for, or how it is held)

    def to_json(self) -> dict:
        return {**asdict(self), "paths": [str(p) for p in self.paths]}


class Collection(Store):
    """A collection on disk (see :mod:`vbcompress.collection.store`), with the ways out of it."""

    def unpack(
        self,
        names: list[str],
        out: str | os.PathLike,
        *,
        dense: bool = False,
        rank: int | str | None = None,
        rank_settings: RankSettings | None = None,
        overwrite: bool = False,
        to: str | None = None,
    ) -> UnpackReport:
        """Write each named adapter as a PEFT VB-LoRA adapter (or, ``dense``, a dense LoRA at ``rank`` by the
        rules of ``vb2lora``, written as ``to``: default the source's own family, see
        :func:`~vbcompress.formats.write_dense`). One name: ``out`` is the adapter; several: ``out/NAME`` each.
        An adapter the collection holds as low-rank factors is always written as a dense PEFT LoRA (the
        report's ``written_as`` says so)."""
        if not names:
            raise SettingError("names", "name at least one adapter to unpack", where=self.path)
        for name in names:
            self.entry(name)
        for setting, value in (("rank", rank), ("to", to)):
            if value is not None and not dense:
                raise SettingError(setting, "{setting} applies to a dense unpack only")
        check_dense_format(to)
        written, written_as = [], []
        with atomic_output_dir(out, overwrite=overwrite, inputs=(self.path,)) as tmp:
            for name in names:
                target = tmp if len(names) == 1 else tmp / name
                as_codes = not dense and self.entry(name).codec == "bank"
                written_as.append("VB-LoRA" if as_codes else "dense LoRA")
                if not dense and not as_codes:
                    adapter = self.adapter(name)  # low-rank factors: a LoRA at the ranks it is held at
                    write_dense(replace(adapter, source_format="peft"), target, "peft", name=name)
                elif dense:
                    adapter, settings = self.adapter(name), rank_settings or RankSettings()
                    lora, _ = truncate(adapter, rank, settings)
                    fmt = to or family_of(self.entry(name).source_format)
                    lora = replace(lora, target_modules=adapter.target_modules, source_format="peft")
                    write_dense(lora, target, fmt, dtype=CAST_DTYPES[settings.dtype], name=name)
                else:
                    meta, vb, carried = self.codes(name)  # the codes as they are: nothing decoded
                    adapter = self._as_adapter(name, meta, {}, carried, vb)
                    write_vblora(adapter, target)
                write_json(target / REPORT_FILE, {"collection": str(self.path), **asdict(self.entry(name))})
                card = unpacked_card(self.entry(name), str(self.path), written_as[-1], adapter.task_type)
                (target / "README.md").write_text(card)
                written.append(Path(out) if len(names) == 1 else Path(out) / name)
            if len(names) > 1:  # marks the folder as ours (for overwrite) and says what it holds
                write_json(tmp / REPORT_FILE, {"collection": str(self.path), "unpacked": names, "dense": dense})
        return UnpackReport(collection=str(self.path), names=list(names), paths=written, dense=dense, to=to, written_as=written_as)

    def materialize(
        self,
        name: str,
        cache_dir: str | os.PathLike,
        *,
        to: str = "peft",
        max_rank: int | None = None,
        base_model: str | None = None,
        cache_bytes: int | None = None,
        dtype: str = "float32",
    ) -> Materialized:
        """Adapter ``name`` as a dense PEFT LoRA folder in the LRU cache ``cache_dir``, for servers that load
        dense LoRA only: one rank (capped at ``max_rank``), scale folded, ``lora_alpha = r``. See
        :mod:`vbcompress.collection.materialize`."""
        if to != "peft":
            raise SettingError("to", f"materialize writes PEFT LoRA folders (what servers load), not {to!r}")
        return materialize_one(self, name, cache_dir, max_rank=max_rank, base_model=base_model, cache_bytes=cache_bytes, dtype=dtype)

    def load_peft(self, model, names: list[str], *, compact: bool = False):
        """Load the named adapters into one PEFT model (switch with ``set_adapter``), holding the bank
        tensor once: every adapter's ``vblora_vector_bank`` entry is the same Parameter.

        ``compact``: keep each adapter as its top-k logits and indices, not PEFT's full ``[..., N]`` logits
        (same outputs, a fraction of the memory; inference only, see :mod:`vbcompress.collection.compact`).
        Each adapter is compacted as soon as it is loaded, so the full logits of one adapter are the peak."""
        PeftModel = requires("peft", "models", "load_peft").PeftModel
        if not names:
            raise SettingError("names", "name at least one adapter to load", where=self.path)
        factors = [n for n in names if self.entry(n).codec != "bank"]
        if factors:
            raise SettingError(
                "names",
                f"{', '.join(factors)} held as low-rank factors, not bank codes: PEFT loads them as LoRA adapters "
                "(unpack them and use PeftModel.from_pretrained / load_adapter)",
                where=self.path,
            )
        with tempfile.TemporaryDirectory() as tmp:
            paths = self.unpack(names, Path(tmp) / "u").paths
            peft_model = None
            for name, path in zip(names, paths, strict=True):
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
                else:
                    peft_model.load_adapter(str(path), adapter_name=name)
                if compact:
                    compact_adapter(peft_model, name)
        banks = peft_model.base_model.vblora_vector_bank
        shared = banks[names[0]]
        for name in names[1:]:
            banks[name] = shared
        peft_model.set_adapter(names[0])
        return peft_model


def inspect_collection(path: str | os.PathLike):
    """The summary ``inspect COLLECTION`` prints."""
    return Collection(path).summary()
