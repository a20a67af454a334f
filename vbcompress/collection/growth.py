"""A grown bank on disk: an adapter's new vectors appended to the collection's bank, committed with it.

The bank is append-only (no code already written names a row that moves), so the grown bank is a new file
named by its hash; the manifest names it (``bank_file``) and is replaced last, so a kill at any moment leaves
the collection with the bank it had, and the next writer removes the file a killed one left.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..codec.layout import stored_index_dtype
from ..files import save_tensors
from .encode import Encoded
from .store import TMP_PREFIX, Manifest, Store, sha256_of
from .writes import discard


def write_grown_bank(root: Path, bank: torch.Tensor, manifest: Manifest) -> tuple[str, str]:
    """Write ``bank`` (the collection's, with rows appended) to a file named by its hash and point ``manifest`` at it;
    returns (the file it replaces, the manifest's former hash). Only the caller's manifest write makes it the
    collection's; until then the file is debris :func:`clean_debris` removes."""
    staging = root / f"{TMP_PREFIX}bank-{os.getpid()}.safetensors"
    save_tensors({"bank": bank.contiguous()}, staging)
    digest = sha256_of(staging)
    name = f"bank-{digest[:16]}.safetensors"
    os.replace(staging, root / name)
    old = (manifest.bank_file, manifest.bank_sha256)
    manifest.bank_file, manifest.bank_sha256 = name, digest
    manifest.settings["num_vectors"] = bank.shape[0]
    return old


def grow(root: Path, coll: Store, enc: Encoded) -> tuple[str, str, int]:
    """Append ``enc``'s vectors to the collection's bank (a new file, named in the manifest in memory only) and
    point its codes at them; returns what :func:`ungrow` needs to put the bank back."""
    manifest, old = coll.manifest, coll.bank
    n, g = old.shape[0], enc.vectors.shape[0]
    if n != enc.bank_size:  # others grew the bank since this was encoded (workers): its new rows moved down
        idx = enc.tensors["indices"].long()
        enc.tensors["indices"] = torch.where(idx >= enc.bank_size, idx + (n - enc.bank_size), idx)
    enc.tensors["indices"] = enc.tensors["indices"].to(stored_index_dtype(n + g))
    enc.entry.codes_bytes = sum(t.numel() * t.element_size() for k, t in enc.tensors.items() if k in ("indices", "weights"))
    enc.entry.bank_rows = [n, n + g]
    file, digest = write_grown_bank(root, torch.cat([old, enc.vectors.to(old.dtype)]), manifest)
    coll.forget_bank()
    return file, digest, n


def ungrow(root: Path, coll: Store, before: tuple[str, str, int]) -> None:
    manifest = coll.manifest
    discard(root / manifest.bank_file)
    manifest.bank_file, manifest.bank_sha256 = before[0], before[1]
    manifest.settings["num_vectors"] = before[2]
    coll.forget_bank()
