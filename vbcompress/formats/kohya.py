"""kohya-ss LoRA: ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

Module names stay in kohya's underscore form (``lora_unet_down_blocks_0_..._to_q``): the dotted path can
only be recovered against the base model's weights, which :mod:`vbcompress.merge` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import FormatError
from .common import build_modules, dtype_name, match_keys, reject_unknown, stored_alpha_scale

RULES = [
    (re.compile(r"^(?P<name>lora_[a-z0-9]+_.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<name>lora_[a-z0-9]+_.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<name>lora_[a-z0-9]+_.+)\.alpha$"), "alpha"),
]


def read_kohya(tensors: dict[str, torch.Tensor], metadata: dict, path: Path) -> Adapter:
    """Build an :class:`Adapter` from a kohya state dict; any key that is not down/up/alpha is an error."""
    pairs, unknown = match_keys(tensors, RULES, path=path)
    reject_unknown(path, unknown, "kohya")
    if not pairs:
        raise FormatError(path, "no lora_down/lora_up tensors found")
    modules = build_modules(pairs, path, stored_alpha_scale)
    return Adapter(
        modules=modules,
        source_format="kohya",
        base_model=metadata.get("ss_sd_model_name") or metadata.get("ss_base_model_version"),
        dtype=dtype_name(tensors),
        config={"metadata": metadata},
        source=str(path),
    )
