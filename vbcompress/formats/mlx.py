"""mlx-lm LoRA adapters: ``adapters.safetensors`` (or the older ``adapters.npz``) + ``adapter_config.json``.

Keys are ``<module>.lora_a: [in, r]`` and ``<module>.lora_b: [r, out]``; mlx-lm adds
``scale · (x @ lora_a) @ lora_b``, so ``ΔW = scale · lora_bᵀ lora_aᵀ``. The scale is
``lora_parameters.scale`` from the config (20.0 when absent, mlx-lm's default), times ``alpha / rank`` when
``lora_parameters`` also names an ``alpha`` (the mlx-examples releases that had one computed it that way).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import FormatError
from ..files import read_json
from .common import Format, Found, build_modules, dtype_name, match_keys, reject_unknown

RULES = [
    (re.compile(r"^(?P<name>.+)\.lora_a$"), "down"),
    (re.compile(r"^(?P<name>.+)\.lora_b$"), "up"),
]
WEIGHT_FILES = ("adapters.safetensors", "adapters.npz")
DEFAULT_SCALE = 20.0


def is_mlx(keys) -> bool:
    return any(k.endswith((".lora_a", ".lora_b")) for k in keys)


def mlx_scale(config: dict, path: Path) -> float:
    """The scale mlx-lm applies, from ``adapter_config.json``'s ``lora_parameters``."""
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise FormatError(path, f"lora_parameters must be a JSON object, not {type(params).__name__}")
    try:
        scale = float(params.get("scale", DEFAULT_SCALE))
        if "alpha" in params:
            scale *= float(params["alpha"]) / float(params["rank"])
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        raise FormatError(path, f"lora_parameters {params} do not give a scale (scale, or alpha with rank)") from None
    return scale


def detect(keys: list[str]) -> bool:
    return is_mlx(keys)


def read(found: Found) -> Adapter:
    cfg = found.weights.parent / "adapter_config.json"
    return read_mlx(found.tensors, read_json(cfg) if cfg.is_file() else {}, found.weights)


def read_mlx(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> Adapter:
    """Build an :class:`Adapter` from an mlx-lm adapter's tensors and config (``{}`` when it has none)."""
    # mlx stores A as [in, r] and B as [r, out]: transposed against PEFT's A [r, in], B [out, r].
    flipped = {k: (t.T if t.dim() == 2 else t) for k, t in tensors.items()}
    pairs, unknown = match_keys(flipped, RULES, path=path)
    reject_unknown(path, unknown, "mlx-lm")
    if not pairs:
        raise FormatError(path, "no lora_a/lora_b tensors found")
    scale = mlx_scale(config, path)
    modules = build_modules(pairs, path, lambda name, r, alpha: scale)
    return Adapter(
        modules=modules,
        source_format="mlx",
        base_model=config.get("model"),
        dtype=dtype_name(tensors),
        config=config,
        source=str(path),
    )


FORMAT = Format("mlx", detect, read)  # read only: mlx-lm users convert with --to peft
