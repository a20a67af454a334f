"""Writing a collection: the writer's lock, journals, staged adapter folders, the manifest replaced last, and
the debris a killed writer leaves (see :mod:`.store` for the layout and the rule that the manifest is the single
source of truth)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import FormatError, OutputError
from ..files import read_json, replace_json, save_tensors, write_json
from ..output import default_permissions, exclusive_lock
from .schema import NAME, check_name
from .store import (
    ADAPTER_FILE,
    ADAPTERS,
    BANK_NAME,
    CODES_FILE,
    FAILURES_FILE,
    JOURNAL_PREFIX,
    LOCK_FILE,
    MANIFEST,
    TMP_PREFIX,
    Entry,
    Manifest,
    sha256_of,
)


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
    """Remove what a killed writer left: its temp files and, where its journal says so, the adapter folder it
    was adding (not in the manifest) or removing. Symbolic links are unlinked, never followed; folders the
    manifest does not name and no journal claims are left alone (:meth:`Store.unlisted` reports them)."""
    removed = []
    for p in sorted(root.glob("bank*.safetensors")):  # a grown bank the manifest never named, or one it no longer names
        if BANK_NAME.fullmatch(p.name) and p.name != manifest.bank_file:
            removed += discard(p)
    for p in sorted(root.glob(TMP_PREFIX + "*")):
        if p.name.startswith(JOURNAL_PREFIX):
            name = p.name[len(JOURNAL_PREFIX) :]
            folder = root / ADAPTERS / name
            if NAME.fullmatch(name) and name not in manifest.adapters and not (root / ADAPTERS).is_symlink():
                removed += discard(folder)
        removed += discard(p)
    return removed


def discard(path: Path) -> list[str]:
    """Delete ``path`` without following a symbolic link out of where it stands."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return []
    return [path.name]


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (adapters keep the order they were added in)."""
    replace_json(root / MANIFEST, manifest.to_json(), sort_keys=False, prefix=TMP_PREFIX + "manifest-")


def adapters_folder(root: Path) -> Path:
    """``root/adapters``, created if missing; a symbolic link there is refused (writes would land elsewhere)."""
    folder = root / ADAPTERS
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FormatError(folder, "is not a folder of the collection (a symbolic link or a file): refused")
    folder.mkdir(exist_ok=True)
    return folder


def journal(root: Path, name: str) -> Path:
    """Mark adapter folder ``name`` as in flux until the manifest is replaced (see :func:`clean_debris`)."""
    path = root / (JOURNAL_PREFIX + name)
    path.touch()
    return path


def write_adapter(root: Path, entry: Entry, tensors: dict[str, torch.Tensor], table: dict, manifest: Manifest) -> Entry:
    """Write one adapter's folder (staged, then renamed into place, journalled) and register ``entry`` with the
    files' hashes in ``manifest``; the caller replaces the manifest file and then calls :func:`settle`."""
    name = check_name(entry.name)
    target = adapters_folder(root) / name
    if target.exists() or target.is_symlink():
        raise OutputError(target, "exists but is not part of the collection: move it away, or choose another name")
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "adapter-", dir=root))
    try:
        (staging / name).mkdir()
        save_tensors(tensors, staging / name / CODES_FILE)
        write_json(staging / name / ADAPTER_FILE, table)
        default_permissions(staging / name)
        entry.codes_sha256 = sha256_of(staging / name / CODES_FILE)
        entry.table_sha256 = sha256_of(staging / name / ADAPTER_FILE)
        journal(root, name)
        os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.adapters[name] = entry
    return entry


def settle(root: Path, names) -> None:
    """The manifest now says what became of ``names``: their journals go."""
    for name in names:
        (root / (JOURNAL_PREFIX + name)).unlink(missing_ok=True)


def read_failures(root: Path) -> tuple[dict, str | None]:
    """The collection's failures log (source → {name, error, attempts}; sources that later landed are gone)
    and a note when a malformed log had to be set aside (renamed, never deleted) to start a new one."""
    path = root / FAILURES_FILE
    if not path.exists() and not path.is_symlink():
        return {}, None
    try:
        data = read_json(path)
        if all(isinstance(v, dict) and isinstance(v.get("attempts", 0), int) for v in data.values()):
            return data, None
        problem = "entries are not {name, error, attempts}"
    except FormatError as e:
        problem = e.problem
    aside = root / f"{FAILURES_FILE}.unreadable"
    os.replace(path, aside)
    return {}, f"{path}: {problem}; set aside as {aside.name}, a new log started"


def write_failures(root: Path, failures: dict) -> None:
    replace_json(root / FAILURES_FILE, failures, prefix=TMP_PREFIX + "failures-")
