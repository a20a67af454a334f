"""Reading tensor files with precise errors, and writing outputs atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FormatError, OutputError


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors header against the file size; return the parsed header.

    safetensors' own message for a truncated file is terse, and users most often meet it after an
    interrupted download, so say how many bytes are missing.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(path, f"not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise FormatError(path, f"truncated safetensors file: header declares {n} bytes, file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(path, f"corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise FormatError(path, "corrupt safetensors header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise FormatError(
            path, f"truncated safetensors file: tensors need {end} bytes of data, file holds {size - 8 - n}"
        )
    return header


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` or PyTorch pickle file, and the safetensors metadata."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise FormatError(path, f"corrupt safetensors file ({e})") from None
    try:
        # Pickles can run code: weights_only refuses anything that is not plain tensors and containers.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many unrelated types for a bad pickle
        raise FormatError(path, f"cannot read as a PyTorch weights file ({e.__class__.__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(path, "not a state dict of tensors")
    return dict(state), {}


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(path, "expected a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs: tuple[str | Path | None, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to ``out`` that becomes ``out`` only if the block succeeds.

    A failure leaves nothing behind; an existing non-empty ``out`` is replaced only with ``overwrite``,
    and never when it is one of the ``inputs``.
    """
    out = Path(out)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise OutputError(out, "output would overwrite the input")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(out, "output exists and is not empty (use {setting} to replace it)", setting="overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def _default_permissions(root: Path) -> None:
    """mkdtemp makes private directories; give the output the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
DTYPE_OF = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
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
