"""Reading tensor files with precise errors, and writing outputs atomically."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FormatError

REPORT_FILE = "vbcompress.json"  # what every adapter output holds: the report, and our mark for --overwrite
MANIFEST_FILE = "collection.json"  # a collection's manifest, and its mark
COLLECTION_LOCK = ".lock"  # inside a collection: every writer of it holds this lock
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors header completely before any tensor is read; return the parsed header.

    Checked: the header length against the file, JSON that is an object of objects, every entry's dtype,
    shape (non-negative integers) and data_offsets (two integers, in order, matching dtype × shape, inside
    the file, not overlapping another tensor), and string metadata. safetensors' own message for a truncated
    file is terse, and users most often meet it after an interrupted download, so say how many bytes are missing.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(path, f"not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise FormatError(path, f"not a safetensors file: header length {n} is over the format's limit")
        if 8 + n > size:
            raise FormatError(path, f"truncated safetensors file: header declares {n} bytes, file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(path, f"corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise FormatError(path, "corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(path, "corrupt safetensors header (__metadata__ must map strings to strings)")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"corrupt safetensors header: tensor {name!r} "
        if not isinstance(entry, dict):
            raise FormatError(path, bad + "is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_OF:
            raise FormatError(path, bad + f"has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(path, bad + f"has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise FormatError(path, bad + f"has invalid data_offsets {offsets!r}")
        need = math.prod(shape) * ELEMENT_SIZE[dtype]
        if offsets[1] - offsets[0] != need:
            raise FormatError(path, bad + f"is {offsets[1] - offsets[0]} bytes, but {dtype} × {shape} needs {need}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(path, f"corrupt safetensors header: tensors {a!r} and {b!r} overlap")
    end = max((e for _, e, _ in spans), default=0)
    if 8 + n + end > size:
        raise FormatError(path, f"truncated safetensors file: tensors need {end} bytes of data, file holds {size - 8 - n}")
    return header


# A pickle may describe far more memory than its file holds (zeros deflated in the zip, one storage viewed
# by many tensors): refuse what would need more than this many times the file size, plus some slack.
PICKLE_EXPANSION = 4


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, read without running code and without materialising a memory bomb:
    storages are checked in the zip's directory (stored, not deflated; their total against the file size)
    and loaded memory-mapped, then every tensor is checked to fit the file without aliasing."""
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            data = [i for i in z.infolist() if "/data/" in i.filename]
            if any(i.compress_type != zipfile.ZIP_STORED for i in data):
                raise FormatError(path, "PyTorch file with compressed tensor data (torch.save never writes that): refused")
            total = sum(i.file_size for i in data)
    except zipfile.BadZipFile:
        raise FormatError(
            path, f"{what_it_is(path)}, not adapter weights: give the adapter's folder or its .safetensors / .bin file"
        ) from None
    if total > PICKLE_EXPANSION * size + (1 << 20):
        raise FormatError(path, f"PyTorch file declares {total} bytes of tensors in a {size}-byte file: refused")
    try:
        # Pickles can run code: weights_only refuses anything that is not plain tensors and containers.
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:  # torch raises many unrelated types for a bad pickle
        first = (str(e).splitlines() or [""])[0][:120]
        raise FormatError(path, f"cannot read as a PyTorch weights file ({e.__class__.__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FormatError(path, "not a state dict of tensors")
    needed = 0
    for key, t in state.items():
        if t.numel() and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            raise FormatError(path, f"tensor {key!r} repeats one value through a zero stride ({t.numel()} elements): refused")
        needed += t.numel() * t.element_size()
    if needed > PICKLE_EXPANSION * size + (1 << 20):
        raise FormatError(path, f"tensors need {needed} bytes from a {size}-byte file (views sharing storage): refused")
    return {k: t.clone() for k, t in state.items()}  # own memory, not the mapped file


def what_it_is(path: Path) -> str:
    """A few words on what a file that is not weights seems to be, from its name and first bytes."""
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if path.suffix == ".json" or head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file" + (" (an adapter's config)" if path.name == "adapter_config.json" else "")
    if path.suffix in (".md", ".txt") or (head and all(32 <= c < 127 or c in (9, 10, 13) for c in head)):
        return "a text file"
    return "not a PyTorch weights file (not a zip archive; pre-1.6 pickles are not read)"


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` or PyTorch pickle file, and the safetensors metadata."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FormatError(path, "a symbolic link that leads nowhere (broken, or a loop)")
    if not path.exists():
        raise FormatError(path, "no such file")
    if not path.is_file():
        raise FormatError(path, "not a regular file" + (" (a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        check_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise FormatError(path, f"corrupt safetensors file ({e})") from None
    if path.suffix == ".npz":
        return read_npz(path), {}
    return read_pickle(path), {}


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Arrays of a NumPy ``.npz`` archive (mlx-lm's older adapter files); object arrays, which would need
    pickle, are refused rather than loaded."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as e:  # numpy's answer to an object array with allow_pickle=False
        raise FormatError(path, f"holds pickled objects, which are never loaded ({str(e).splitlines()[0][:80]})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise FormatError(path, f"corrupt .npz archive ({e.__class__.__name__})") from None
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "fiub" or a.dtype.itemsize > 8:
            raise FormatError(path, f"{k}: unsupported array dtype {a.dtype}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a))
    return out


MAX_JSON = 64 << 20  # configs, manifests and tables are small: anything larger is not one of them


def read_json(path: str | Path, max_bytes: int = MAX_JSON) -> dict:
    """A JSON object from a regular file of at most ``max_bytes``: devices, FIFOs and folders are refused
    before they are opened (a FIFO would block, /dev/zero never ends), and nesting too deep for Python's
    parser is a FormatError, not a RecursionError."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FormatError(path, "no such file")
    if not path.is_file():
        raise FormatError(path, "not a regular file" + (" (a folder)" if path.is_dir() else ""))
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise FormatError(path, f"cannot read ({e.strerror})") from None
    if len(raw) > max_bytes:
        raise FormatError(path, f"over {max_bytes >> 20} MiB: too large for a JSON file vbcompress reads")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"invalid JSON ({e})") from None
    except RecursionError:
        raise FormatError(path, "invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise FormatError(path, "expected a JSON object")
    return data


def write_json(path: Path, data: dict, *, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def replace_json(path: Path, data: dict, *, sort_keys: bool = True, prefix: str = ".tmp-") -> None:
    """Replace ``path`` atomically: written to a synced temp file beside it, then renamed; a reader sees the
    old file or the new one, never a torn one."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: give it the mode a plain open would
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
ELEMENT_SIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPE_OF.items()}
CAST_DTYPES = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stream_safetensors(
    path: Path, layout: list[tuple[str, list[int], torch.dtype]], tensors: Iterator[torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file one tensor at a time: ``layout`` lists (name, shape, dtype) in order and
    ``tensors`` yields them in that order. Only a tensor or two are in memory at a time (``save_file`` needs
    all of them, and copies them into one buffer); the disk write of one overlaps the making of the next.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in layout:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f, _Behind(1) as behind:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), t in zip(layout, tensors, strict=True):
            if list(t.shape) != list(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: got {list(t.shape)} {t.dtype}, header says {shape} {dtype}")
            data = t.contiguous().view(torch.uint8).reshape(-1).numpy()
            behind.submit(f.write, data)


def iter_safetensors(path: Path, header: dict, ring: int = 4) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file in header order, each read with a plain ``read`` (no mmap), so that
    only the tensors in hand are resident: a mapped file's touched pages count as the process's memory.

    The next tensor is read while the caller works on this one, into a ring of ``ring`` reused buffers
    (fresh memory for every tensor costs a page fault per 4 KiB, more than the copy itself). A yielded
    tensor stays valid until ``ring - 1`` more have been yielded: enough for one being processed and one
    being written behind (:func:`stream_safetensors`).
    """
    names = [k for k in header if k != "__metadata__"]
    size = max((header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names), default=0)
    buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(min(ring, len(names)))]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))

        def read(i: int) -> torch.Tensor:
            meta = header[names[i]]
            start, end = meta["data_offsets"]
            buf = buffers[i % len(buffers)][: end - start]
            f.seek(8 + n + start)
            if end > start and f.readinto(buf.numpy()) != end - start:
                raise FormatError(path, f"tensor {names[i]}: file ended early")
            return buf.view(DTYPE_OF[meta["dtype"]]).reshape(meta["shape"])

        with _Behind(1) as ahead:
            pending = ahead.submit(read, 0) if names else None
            for i, name in enumerate(names):
                t = pending.result()
                pending = ahead.submit(read, i + 1) if i + 1 < len(names) else None
                yield name, t


class _Behind:
    """A one-thread executor that keeps at most ``depth`` jobs outstanding: I/O overlapped with compute,
    memory bounded. Leaving the block waits for every job (and raises the first error)."""

    def __init__(self, depth: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.depth, self.jobs = ThreadPoolExecutor(1), depth, []

    def submit(self, fn, *args):
        while len(self.jobs) >= self.depth:
            self.jobs.pop(0).result()
        job = self.pool.submit(fn, *args)
        self.jobs.append(job)
        return job

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            for job in self.jobs:
                job.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False
