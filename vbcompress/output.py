"""Output targets: checked before any work, one writer at a time, written whole or not at all.

A command claims its output first (:func:`claim_output`): the target must be writable, must not be or hold
or sit inside one of the command's inputs, and an existing non-empty target is replaced only with
``overwrite`` and only when it is an earlier vbcompress output (it holds ``vbcompress.json`` or
``collection.json``). The claim takes a lock, so a second run writing the same target fails at once. The
output is written into a temporary sibling folder and renamed into place at the end; what a killed run
leaves behind (temp and swap folders named after the target, with a dead process id) is removed by the
next claim of the same target.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError
from .files import COLLECTION_LOCK, MANIFEST_FILE, REPORT_FILE

MARKERS = (REPORT_FILE, MANIFEST_FILE)


def exclusive_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its open descriptor, or None when another
    process holds it. The OS releases it when the process dies, however it dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class OutputTarget:
    """A claimed output path: checked, locked, with stale temp folders of earlier runs removed."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, inputs: tuple = (), ours: Callable[[Path], bool] | None = None):
        """``ours``: the output is one file (``out`` names it), and this says whether an existing one was
        written by vbcompress (and so may be replaced with ``overwrite``)."""
        self.out = Path(out)
        self.overwrite = overwrite
        self.single_file = ours is not None
        self.fd: int | None = None
        out = self.out.absolute()
        resolved = Path(os.path.realpath(out))
        for src in inputs:
            if src is None or not Path(src).exists():
                continue
            src = Path(os.path.realpath(src))
            if _inside(src, resolved):
                raise OutputError(
                    self.out,
                    "output would overwrite an input (the input is at or inside it)"
                    if src != resolved
                    else "output would overwrite the input",
                )
            if _inside(resolved, src):
                raise OutputError(self.out, f"output would be written inside the input {src} (inputs are never modified)")
        parent = out.parent
        for p in (parent, *parent.parents):
            if p.exists() and not p.is_dir():
                raise OutputError(self.out, f"cannot create the output: {p} is a file, not a folder")
        if ours is not None and (out.exists() or out.is_symlink()):
            if not out.is_file() or out.is_symlink():
                raise OutputError(self.out, "output exists and is not a file: choose another name")
            if not ours(out):
                raise OutputError(self.out, "output exists and is not a file vbcompress wrote: it is never replaced; choose another name")
            if not overwrite:
                raise OutputError(
                    self.out, "output exists: an earlier vbcompress output (use {setting} to replace it)", setting="overwrite"
                )
        elif out.exists() or out.is_symlink():
            if not out.is_dir() or out.is_symlink():
                raise OutputError(self.out, "output exists and is not a folder")
            if any(out.iterdir()):
                ours = any((out / m).is_file() for m in MARKERS)
                if not overwrite and ours:
                    raise OutputError(
                        self.out, "output exists: an earlier vbcompress output (use {setting} to replace it)", setting="overwrite"
                    )
                if not ours:
                    raise OutputError(
                        self.out,
                        f"output exists and is not a vbcompress output (no {REPORT_FILE}): "
                        "vbcompress never replaces files it did not write; choose another folder",
                    )
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(self.out, f"cannot create the output folder's parent ({e.strerror})") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(self.out, f"cannot write in {parent} (permission denied)")
        self._lock()
        self._clean_stale()
        self._lock_collection()

    @property
    def _lock_path(self) -> Path:
        return self.out.absolute().parent / f".{self.out.name}.lock"

    def _lock(self) -> None:
        try:
            self.fd = exclusive_lock(self._lock_path)
        except OSError as e:
            raise OutputError(self.out, f"cannot write next to the output ({e.strerror})") from None
        if self.fd is None:
            raise OutputError(self.out, "another vbcompress process is writing this output; wait for it or choose another")

    def _lock_collection(self) -> None:
        """Replacing a collection takes the lock its own writers (``add``, ``remove``) take, inside it."""
        self.inner_fd = None
        out = self.out.absolute()
        if (out / MANIFEST_FILE).is_file() and not out.is_symlink():
            self.inner_fd = exclusive_lock(out / COLLECTION_LOCK)
            if self.inner_fd is None:
                self.release()
                raise OutputError(
                    self.out, "another vbcompress process is writing this collection (it is locked); try again when it has finished"
                )

    def _clean_stale(self) -> None:
        out = self.out.absolute()
        pattern = re.compile(rf"^\.{re.escape(self.out.name)}\.(tmp|old)-(\d+)-")
        for p in sorted(out.parent.iterdir(), key=lambda p: p.name):
            m = pattern.match(p.name)
            if m and not _pid_alive(int(m[2])):
                if m[1] == "old" and (p / "x").is_dir() and not out.exists() and not out.is_symlink():
                    os.replace(p / "x", out)  # killed between the two renames of a replace: the old output comes back
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def release(self) -> None:
        if getattr(self, "inner_fd", None) is not None:
            os.close(self.inner_fd)
            self.inner_fd = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self._lock_path.unlink()
            os.close(self.fd)
            self.fd = None

    def read_back(self, read, tmp: Path):
        """``read(tmp)`` — re-reading what was just written — with errors naming the output, not the temp folder."""
        from .errors import VBCompressError

        try:
            return read(tmp)
        except VBCompressError as e:
            raise OutputError(self.out, f"the output did not read back as written ({e.problem}); nothing was written") from None

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        """Yield a temporary folder next to the target that becomes the target only if the block succeeds (for a
        one-file output, the block writes ``tmp / out.name``, which replaces the target)."""
        out = self.out.absolute()
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        except OSError as e:
            raise OutputError(self.out, f"cannot write next to the output ({e.strerror})") from None
        try:
            yield tmp
            default_permissions(tmp)
            if self.single_file:
                os.replace(tmp / out.name, out)  # a file is replaced in one step
                shutil.rmtree(tmp, ignore_errors=True)
            elif out.exists():
                if exchange(tmp, out):  # one atomic step: a reader sees the old output or the new, never neither
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                    os.replace(out, old / "x")
                    os.replace(tmp, out)  # a kill between the two: the next claim puts the old one back
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                raise OutputError(self.out, "no space left on the device; nothing was written") from None
            raise


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike, overwrite: bool = False, inputs: tuple = (), ours: Callable[[Path], bool] | None = None
) -> Iterator[OutputTarget]:
    """Check and lock ``out`` for the duration of a command (see the module docstring; ``ours``: a one-file
    output, see :class:`OutputTarget`)."""
    target = OutputTarget(out, overwrite, inputs, ours)
    try:
        yield target
    finally:
        target.release()


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: tuple = ()) -> Iterator[Path]:
    """Claim ``out`` and write it in one step: for commands whose work happens inside the block."""
    with claim_output(out, overwrite, inputs) as target, target.write() as tmp:
        yield tmp


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    except (OSError, AttributeError):
        return False
    return rc == 0


def _disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT from Python's own I/O, or as safetensors' Rust writer words it."""
    text = str(error)
    return getattr(error, "errno", None) in (28, 122) or "No space left" in text or "StorageFull" in text or "code: 28" in text


def default_permissions(root: Path) -> None:
    """mkdtemp makes private directories; give the output the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
