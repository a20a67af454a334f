"""One adapter of a collection as a dense PEFT LoRA folder in a byte-bounded LRU cache: what a server that
loads dense LoRA only (vLLM, SGLang, LoRAX) reads on demand, so the collection never has to be unpacked whole.

Every folder is written for the strictest loader: the scale is folded into B and ``lora_alpha = r`` (scaling
1 under ``alpha / r`` and under rsLoRA-unaware readers alike), one rank for every module (zero-padded, since
vLLM reads neither ``rank_pattern`` everywhere nor ``alpha_pattern`` at all), capped by truncated SVD when a
server's ``--max-lora-rank`` is below the adapter's. A folder is named by a digest of everything it is made
from (codes, table, bank, rank cap, base name, dtype), so a re-added adapter gets a fresh folder and a new id.

Concurrency: a folder is written under a temporary name and renamed into place (readers never see half a
folder; when two processes race, the first rename wins and the other's copy is dropped); eviction holds
``.lock`` and renames a victim away before deleting it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import SettingError
from ..files import CAST_DTYPES, REPORT_FILE, write_json
from ..formats.peft_lora import write_peft_lora
from ..linalg import balanced
from .store import Store

# vLLM's accepted --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LOCK = ".lock"
TMP = ".tmp-"
STALE_TMP_S = 3600  # a temporary folder this old belongs to a writer that died


@dataclass(frozen=True)
class Materialized:
    """A cached dense copy: ``path`` holds ``adapter_config.json`` and ``adapter_model.safetensors``."""

    name: str
    path: Path
    rank: int
    digest: str  # of what the folder is made from: changes when the adapter does
    hit: bool  # already in the cache
    capped: dict[str, float]  # module → relative ΔW error, for modules truncated to the rank cap

    @property
    def int_id(self) -> int:
        """A positive id stable across processes (vLLM keys loaded adapters by it)."""
        return int(self.digest[:15], 16) or 1


def folder_digest(store: Store, name: str, max_rank: int | None, base_model: str | None, dtype: str) -> str:
    entry = store.entry(name)
    # The name is part of it: vLLM keys loaded adapters by the id drawn from this, and two names may hold equal codes.
    parts = [name, entry.codes_sha256, entry.table_sha256, store.manifest.bank_sha256, max_rank, base_model, dtype, "peft-v1"]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def uniform_rank(adapter: Adapter, max_rank: int | None) -> tuple[Adapter, int, dict[str, float]]:
    """``adapter`` at one rank ``r`` for every module (the largest, capped at ``max_rank``), scale folded
    into B (so ``lora_alpha = r`` reproduces ΔW), and the relative ΔW error of each capped module."""
    largest = max(m.r for m in adapter.modules.values())
    r = largest if max_rank is None else min(largest, max_rank)
    modules, capped = {}, {}
    for name, m in adapter.modules.items():
        b, a = m.folded()
        if m.r > r:
            b, a, s = balanced(b, a)
            capped[name] = float(s[r:].square().sum().div(s.square().sum().clamp_min(1e-30)).sqrt())
            b, a = b[:, :r].contiguous(), a[:r].contiguous()
        pad = r - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        modules[name] = replace(m, A=a, B=b, scale=1.0, alpha=float(r))
    return replace(adapter, modules=modules, vector_bank=None, source_format="peft"), r, capped


def materialize(
    store: Store,
    name: str,
    cache_dir: str | os.PathLike,
    *,
    max_rank: int | None = None,
    base_model: str | None = None,
    cache_bytes: int | None = None,
    dtype: str = "float32",
) -> Materialized:
    """Adapter ``name`` of ``store`` as a dense PEFT LoRA folder under ``cache_dir`` (see the module doc).

    ``base_model`` is written as ``base_model_name_or_path`` (the name the server gives the base; default the
    collection's); ``cache_bytes`` bounds the cache, least recently used folders evicted first (the folder
    returned is never evicted by its own call)."""
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise SettingError("max_rank", f"{{setting}} must be a positive integer, not {max_rank!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise SettingError("dtype", f"{{setting}} must be float32, float16 or bfloat16, not {dtype!r}")
    base_model = base_model or store.manifest.base_model
    digest = folder_digest(store, name, max_rank, base_model, dtype)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{name}--{digest[:16]}"
    if (final / "adapter_config.json").is_file():
        with contextlib.suppress(FileNotFoundError):
            os.utime(final)  # most recently used
            meta = json.loads((final / REPORT_FILE).read_text())
            return Materialized(name, final, meta["rank"], digest, True, meta["capped"])
    adapter, r, capped = uniform_rank(replace(store.adapter(name), base_model=base_model), max_rank)
    tmp = Path(tempfile.mkdtemp(prefix=TMP, dir=cache))
    try:
        write_peft_lora(adapter, tmp, dtype=CAST_DTYPES[dtype])
        report = {"collection": str(store.path), "name": name, "rank": r, "digest": digest, "capped": capped, "dtype": dtype}
        write_json(tmp / REPORT_FILE, report)
        try:
            os.rename(tmp, final)
        except OSError:  # another process put the same folder in place first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if cache_bytes is not None:
        evict(cache, cache_bytes, keep=final)
    return Materialized(name, final, r, digest, False, capped)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def evict(cache: Path, cache_bytes: int, keep: Path | None = None) -> list[str]:
    """Delete least recently used folders until the cache holds at most ``cache_bytes``; returns their names."""
    fd = os.open(cache / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        now, folders = time.time(), []
        for p in cache.iterdir():
            try:
                st = p.stat()
                if p.name.startswith(TMP):
                    if now - st.st_mtime > STALE_TMP_S:
                        shutil.rmtree(p, ignore_errors=True)
                elif p.is_dir() and not p.is_symlink():
                    folders.append((st.st_mtime, p, folder_bytes(p)))
            except FileNotFoundError:
                continue  # removed meanwhile by a process that does not hold the lock (a racing rename)
        total, evicted = sum(size for *_, size in folders), []
        for _, p, size in sorted(folders, key=lambda t: t[0]):
            if total <= cache_bytes:
                break
            if keep is not None and p == keep:
                continue
            doomed = cache / f"{TMP}evict-{p.name}-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(p, doomed)  # gone from readers at once; deleting may take a while
                shutil.rmtree(doomed, ignore_errors=True)
                total -= size
                evicted.append(p.name)
        return evicted
    finally:
        os.close(fd)
