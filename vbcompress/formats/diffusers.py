"""diffusers LoRA files: PEFT-style keys without the ``base_model.model.`` prefix (config possibly in the
safetensors metadata ``lora_adapter_metadata``), and the legacy attention-processor layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import FormatError, ShapeError, listed
from ..files import save_tensors
from .common import (
    Format,
    Found,
    build_modules,
    dtype_name,
    header_config,
    match_keys,
    peft_scale,
    reject_unknown,
    stored_alpha_scale,
    stored_factors,
)
from .kohya import dotted_name
from .peft_lora import lora_config

RULES = [
    (re.compile(r"^(?P<name>.+)\.lora_A\.weight$"), "down"),
    (re.compile(r"^(?P<name>.+)\.lora_B\.weight$"), "up"),
    (re.compile(r"^(?P<name>.+)\.alpha$"), "alpha"),
]
# Legacy attention processors: `<block>.processor.to_q_lora.down.weight` adapts `<block>.to_q`;
# `to_out_lora` adapts `to_out.0`. LoRACompatibleLinear writes `<module>.lora.down.weight`.
LEGACY_RULES = [
    (re.compile(r"^(?P<name>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<name>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<name>.+)\.lora(_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(?P<name>.+)\.lora(_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(?P<name>.+?)(\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora|\.lora(_linear_layer)?)?\.alpha$"), "alpha"),
]


def _legacy_name(m: re.Match) -> str:
    proj = m.groupdict().get("proj")
    if not proj:
        return m["name"]
    return f"{m['name']}.{proj}.0" if proj == "to_out" else f"{m['name']}.{proj}"


def is_legacy(keys) -> bool:
    return any(".processor." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys)


def detect(keys: list[str]) -> bool:
    return is_legacy(keys) or any(k.endswith(".lora_A.weight") for k in keys)


def read(found: Found) -> Adapter:
    return read_diffusers(found.tensors, found.metadata, found.weights)


def read_diffusers(tensors: dict[str, torch.Tensor], metadata: dict, path: Path) -> Adapter:
    """Build an :class:`Adapter` from a diffusers LoRA state dict (either layout)."""
    config = header_config(metadata, path) or {}
    if is_legacy(tensors):
        pairs, unknown = match_keys(tensors, LEGACY_RULES, _legacy_name, path)
        source_format = "diffusers-legacy"
    else:
        pairs, unknown = match_keys(tensors, RULES, path=path)
        source_format = "diffusers"
    reject_unknown(path, unknown, "diffusers")
    if not pairs:
        raise FormatError(path, "no LoRA tensors found")
    # Without a config diffusers uses the stored network alpha, or alpha = r (scale 1).
    scale_of = peft_scale(config) if config else stored_alpha_scale

    modules = build_modules(pairs, path, scale_of)
    return Adapter(
        modules=modules,
        source_format=source_format,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        target_modules=config.get("target_modules"),
        dtype=dtype_name(tensors),
        config=config,
        source=str(path),
    )


def write_diffusers(adapter: Adapter, file: Path, dtype: torch.dtype | None = None) -> None:
    """Write ``adapter``'s modules as a diffusers LoRA file (``pytorch_lora_weights.safetensors``).

    Modules of one component (a UNet adapter, as ``save_lora_adapter`` writes it) keep bare module paths
    and carry their PEFT config in the ``lora_adapter_metadata`` header; several components get
    ``unet.`` / ``text_encoder.`` prefixes, as ``save_lora_weights`` writes them (no config: diffusers
    then takes alpha = r, so each module's scale is folded into its B). Kohya names are spelled
    as dotted paths first; a module with no dotted path is an error that lists it.
    """
    placed = {n: dotted_name(n) for n in adapter.modules}
    unnamed = [n for n, p in placed.items() if p is None]
    if unnamed:
        raise ShapeError(
            adapter.source,
            f"no diffusers module path for: {listed(unnamed)} (SDXL sgm block names map only with the model; write kohya instead)",
        )
    bare = len({c for c, _ in placed.values()}) == 1
    keys = {n: path if bare or not component else f"{component}.{path}" for n, (component, path) in placed.items()}
    renamed = replace(adapter, modules={keys[n]: m for n, m in adapter.modules.items()}, source_format="diffusers", target_modules=None)
    tensors = {}
    for key, m in renamed.modules.items():
        if not bare and m.scale != 1.0:
            m = replace(m, B=m.B.float() * m.scale, scale=1.0, alpha=None)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = stored_factors(m, dtype or renamed.modules[key].B.dtype)
    metadata = {"format": "pt"}
    if bare:
        metadata["lora_adapter_metadata"] = json.dumps(lora_config(renamed, renamed.modules), indent=2, sort_keys=True)
    save_tensors(tensors, file, metadata=metadata)


def write(adapter: Adapter, out: Path, dtype: torch.dtype | None = None, name: str | None = None) -> Path:
    """``OUT/pytorch_lora_weights.safetensors``: what ``load_lora_weights(OUT)`` looks for."""
    write_diffusers(adapter, out / "pytorch_lora_weights.safetensors", dtype)
    return out / "pytorch_lora_weights.safetensors"


FORMAT = Format("diffusers", detect, read, write)
