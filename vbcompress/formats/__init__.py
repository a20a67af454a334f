"""Readers and writers, one module per format, and format detection."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import FormatError, SettingError, ShapeError, listed
from ..files import read_json, read_tensors
from .common import check_config, check_finite, header_config
from .diffusers import is_legacy, read_diffusers, write_diffusers
from .kohya import dotted_name, read_kohya, write_kohya
from .mlx import WEIGHT_FILES as MLX_FILES, is_mlx, read_mlx
from .peft_lora import read_peft_lora, write_peft_lora
from .vblora import read_vblora, write_vblora

FORMATS = ("peft", "vblora", "kohya", "diffusers", "mlx")
DENSE_FORMATS = ("peft", "kohya", "diffusers")  # what a dense LoRA can be written as
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", *MLX_FILES)
__all__ = ["DENSE_FORMATS", "FORMATS", "detect_format", "load_adapter", "write_dense", "write_diffusers", "write_kohya", "write_peft_lora", "write_vblora"]


def detect_format(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Which format a state dict is in, judged from its keys."""
    keys = list(tensors)
    if any("vblora_vector_bank" in k or ".vblora_logits_" in k for k in keys):
        return "vblora"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if is_mlx(keys):
        return "mlx"
    if any(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_embedding_A" in k) for k in keys):
        return "peft"
    if is_legacy(keys) or any(k.endswith(".lora_A.weight") for k in keys):
        return "diffusers"
    shown = ", ".join(keys[:3]) if keys else "the file holds no tensors"
    raise FormatError(path, f"no LoRA tensors recognised (keys: {shown})")


def _peft_config(path: Path, weights: Path, peft_type: str, metadata: dict | None = None) -> dict:
    cfg_path = path / "adapter_config.json" if path.is_dir() else weights.parent / "adapter_config.json"
    if cfg_path.is_file():
        config = read_json(cfg_path)
    elif (config := header_config(metadata, weights)) is not None:  # a lone weights file whose header carries its config
        cfg_path = weights
    else:
        raise FormatError(cfg_path, f"missing adapter_config.json next to {weights.name}")
    # No peft_type in an old config: the tensors say which it is.
    found = config.get("peft_type", "VBLORA" if peft_type == "vblora" else "LORA")
    if str(found).upper() not in ("LORA", "VBLORA"):
        raise FormatError(cfg_path, f"unsupported peft_type {found!r} (vbcompress reads LORA and VBLORA)")
    return check_config(config, cfg_path)


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
    if fmt in ("peft", "vblora"):
        config = _peft_config(path, weights, fmt, metadata)
        if str(config.get("peft_type", fmt)).upper() == "VBLORA" or fmt == "vblora":
            return read_vblora(tensors, config, weights)
        return read_peft_lora(tensors, config, weights)
    if fmt == "kohya":
        return read_kohya(tensors, metadata, weights)
    if fmt == "mlx":
        cfg = weights.parent / "adapter_config.json"
        return read_mlx(tensors, read_json(cfg) if cfg.is_file() else {}, weights)
    return read_diffusers(tensors, metadata, weights)


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
    if to == "kohya":
        file = out / f"{name or out.name}.safetensors"
        write_kohya(adapter, file, dtype, metadata=adapter.config.get("metadata"))
        return file
    if to == "diffusers":
        write_diffusers(adapter, out / "pytorch_lora_weights.safetensors", dtype)
        return out / "pytorch_lora_weights.safetensors"
    write_peft_lora(peft_named(adapter), out, dtype=dtype)
    return out / "adapter_model.safetensors"


def peft_named(adapter: Adapter) -> Adapter:
    """A kohya/diffusers adapter with PEFT module paths: dotted, relative to its one model."""
    placed = {n: dotted_name(n) for n in adapter.modules}
    if all(p is not None and p[1] == n for n, p in placed.items()):
        return adapter  # already PEFT paths (an LLM's, or a bare UNet's)
    unnamed = [n for n, p in placed.items() if p is None]
    if unnamed:
        raise ShapeError(adapter.source, f"no dotted module path for: {listed(unnamed)}")
    components = sorted({c for c, _ in placed.values() if c})
    if len(components) > 1:
        raise ShapeError(adapter.source, f"a PEFT adapter adapts one model; this LoRA spans {', '.join(components)} (write kohya or diffusers)")
    return replace(adapter, modules={placed[n][1]: m for n, m in adapter.modules.items()}, target_modules=None)
