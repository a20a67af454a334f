"""Readers and writers, one module per format, and format detection."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import FormatError, SettingError
from ..files import read_json, read_tensors
from .common import check_config, check_finite
from .diffusers import is_legacy, read_diffusers
from .kohya import read_kohya
from .peft_lora import read_peft_lora, write_peft_lora
from .vblora import read_vblora, write_vblora

FORMATS = ("peft", "vblora", "kohya", "diffusers")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
__all__ = ["FORMATS", "detect_format", "load_adapter", "write_peft_lora", "write_vblora"]


def detect_format(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Which format a state dict is in, judged from its keys."""
    keys = list(tensors)
    if any("vblora_vector_bank" in k or ".vblora_logits_" in k for k in keys):
        return "vblora"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_embedding_A" in k) for k in keys):
        return "peft"
    if is_legacy(keys) or any(k.endswith(".lora_A.weight") for k in keys):
        return "diffusers"
    shown = ", ".join(keys[:3]) if keys else "the file holds no tensors"
    raise FormatError(path, f"no LoRA tensors recognised (keys: {shown})")


def _peft_config(path: Path, weights: Path, peft_type: str) -> dict:
    cfg_path = path / "adapter_config.json" if path.is_dir() else weights.parent / "adapter_config.json"
    if not cfg_path.is_file():
        raise FormatError(cfg_path, f"missing adapter_config.json next to {weights.name}")
    config = read_json(cfg_path)
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
        config = _peft_config(path, weights, fmt)
        if str(config.get("peft_type", fmt)).upper() == "VBLORA" or fmt == "vblora":
            return read_vblora(tensors, config, weights)
        return read_peft_lora(tensors, config, weights)
    if fmt == "kohya":
        return read_kohya(tensors, metadata, weights)
    return read_diffusers(tensors, metadata, weights)
