"""Readers and writers, one module per format, behind one registry: each format module gives a
:class:`~.common.Format` (``name``, ``detect``, ``read``, ``write``) and :data:`REGISTRY` lists them in the
order detection tries them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import FormatError, SettingError
from ..files import read_tensors
from ..settings import DENSE_FORMATS, FORMATS
from . import diffusers, kohya, mlx, peft_lora, vblora
from .common import Format, Found, check_finite
from .mlx import WEIGHT_FILES as MLX_FILES
from .peft_lora import peft_named, write_peft_lora
from .vblora import write_vblora

# Detection order matters: VB-LoRA keys also carry PEFT's prefix, and diffusers' bare lora_A keys are the
# least specific.
REGISTRY: dict[str, Format] = {f.name: f for f in (vblora.FORMAT, kohya.FORMAT, mlx.FORMAT, peft_lora.FORMAT, diffusers.FORMAT)}
assert set(REGISTRY) == set(FORMATS) and {n for n, f in REGISTRY.items() if f.write} == set(DENSE_FORMATS)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", *MLX_FILES)
__all__ = [
    "DENSE_FORMATS",
    "FORMATS",
    "REGISTRY",
    "detect_format",
    "load_adapter",
    "peft_named",
    "write_dense",
    "write_peft_lora",
    "write_vblora",
]


def detect_format(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Which format a state dict is in, judged from its keys."""
    keys = list(tensors)
    for fmt in REGISTRY.values():
        if fmt.detect(keys):
            return fmt.name
    shown = ", ".join(keys[:3]) if keys else "the file holds no tensors"
    raise FormatError(path, f"no LoRA tensors recognised (keys: {shown})")


def weights_in(path: Path) -> Path:
    """The weights file of an adapter directory."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    loose = sorted(path.glob("*.safetensors"))
    if len(loose) == 1:
        return loose[0]
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return path / "pytorch_lora_weights.safetensors"
    what = f"{len(loose)} .safetensors files, none named adapter_model.safetensors" if loose else "no adapter weights"
    raise FormatError(path, f"no adapter found ({what})")


def load_adapter(path: str | os.PathLike, format: str | None = None, allow_nonfinite: bool = False) -> Adapter:
    """Read an adapter from a local directory or weights file, detecting its format unless ``format`` is
    given. (Commands take Hub ids too: they resolve them to a local path with :func:`vbcompress.hub.resolve`.)

    Raises :class:`~vbcompress.errors.FormatError` naming the file and the problem for bad input, and
    for NaN/Inf values unless ``allow_nonfinite``.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FormatError(path, "a symbolic link that leads nowhere (broken, or a loop)")
    if not path.exists():
        raise FormatError(path, "no such file or directory")
    if format is not None and format not in FORMATS:
        raise SettingError("format", f"{{setting}} {format!r} is not one of {', '.join(FORMATS)}", where=path)
    weights = weights_in(path) if path.is_dir() else path
    tensors, metadata = read_tensors(weights)
    fmt = format or detect_format(tensors, weights)
    if not allow_nonfinite:
        check_finite(weights, tensors)
    found = Found(tensors=tensors, metadata=metadata, weights=weights, path=path)
    if fmt == "peft" and vblora.detect(list(tensors)):  # --format peft on a VB-LoRA file: its config decides
        fmt = "vblora"
    return REGISTRY[fmt].read(found)


def family_of(source_format: str) -> str:
    """The dense format a source's users load: kohya stays kohya, diffusers stays diffusers, the rest PEFT."""
    return {"kohya": "kohya", "diffusers": "diffusers", "diffusers-legacy": "diffusers"}.get(source_format, "peft")


def check_dense_format(to: str | None) -> None:
    """``to`` is one of :data:`DENSE_FORMATS` (or None, the source's family): commands check it before any work."""
    if to is not None and to not in DENSE_FORMATS:
        raise SettingError("to", f"{{setting}} {to!r} is not one of {', '.join(DENSE_FORMATS)}")


def write_dense(adapter: Adapter, out: str | os.PathLike, to: str, dtype: torch.dtype | None = None, name: str | None = None) -> Path:
    """Write a dense LoRA into the directory ``out`` as ``to`` (:data:`DENSE_FORMATS`); returns the weights file.

    kohya: ``OUT/<name or OUT's name>.safetensors`` (one file, as ComfyUI and A1111 load it); diffusers:
    ``OUT/pytorch_lora_weights.safetensors`` (what ``load_lora_weights(OUT)`` looks for); PEFT: the usual
    pair. Module names are translated (kohya underscores ↔ dotted paths); one the target cannot name is an
    error that lists it, never dropped.
    """
    check_dense_format(to)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return REGISTRY[to].write(adapter, out, dtype, name)
