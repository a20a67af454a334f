"""PEFT LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a legacy ``adapter_model.bin``)."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import EMBEDDING, Adapter, LoraModule
from ..errors import FormatError, ShapeError, listed
from ..files import read_json, save_tensors, write_json
from .common import (
    Format,
    Found,
    build_modules,
    check_config,
    dtype_name,
    header_config,
    match_keys,
    pattern_value,
    peft_scale,
    reject_unknown,
    stored_factors,
)
from .kohya import dotted_name

PREFIX = "base_model.model."
RULES = [
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_A\.weight$"), "down"),
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_B\.weight$"), "up"),
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_embedding_A$"), "down_emb"),
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_embedding_B$"), "up_emb"),
]
# Parts of a LoRA that are not factors but must travel with it: DoRA magnitudes, LoRA biases.
CARRIED_LORA_PARTS = re.compile(r"\.(lora_magnitude_vector(\.weight)?|lora_B\.bias)$")


def detect(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) and (".lora_A." in k or ".lora_embedding_A" in k) for k in keys)


def peft_config(found: Found, peft_type: str) -> dict:
    """The adapter's PEFT config: ``adapter_config.json`` beside the weights, or the weights header's
    ``lora_adapter_metadata`` for a lone file; checked, and of a type we read."""
    cfg_path = found.sibling_json("adapter_config.json")
    if cfg_path.is_file():
        config = read_json(cfg_path)
    elif (config := header_config(found.metadata, found.weights)) is not None:
        cfg_path = found.weights
    else:
        raise FormatError(cfg_path, f"missing adapter_config.json next to {found.weights.name}")
    # No peft_type in an old config: the tensors say which it is.
    kind = config.get("peft_type", peft_type)
    if str(kind).upper() not in ("LORA", "VBLORA"):
        raise FormatError(cfg_path, f"unsupported peft_type {kind!r} (vbcompress reads LORA and VBLORA)")
    return check_config(config, cfg_path)


def read(found: Found) -> Adapter:
    config = peft_config(found, "LORA")
    if str(config.get("peft_type", "LORA")).upper() == "VBLORA":
        raise FormatError(
            found.weights, "VB-LoRA file without base_model.vblora_vector_bank (its config says VBLORA, its tensors are LoRA)"
        )
    return read_peft_lora(found.tensors, config, found.weights)


def read_peft_lora(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> Adapter:
    """Build an :class:`Adapter` from a PEFT LoRA state dict and its config."""
    pairs, rest = match_keys(tensors, RULES, path=path)
    unknown = [k for k in rest if "lora_" in k and not CARRIED_LORA_PARTS.search(k)]
    reject_unknown(path, unknown, "LoRA")
    if not pairs:
        raise FormatError(path, "no lora_A/lora_B tensors found")
    scale_of = peft_scale(config)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    modules = build_modules(pairs, path, scale_of, fan_in_fan_out)
    if config.get("r") is not None:
        for name, m in modules.items():
            expected = pattern_value(config.get("rank_pattern"), name, config["r"])
            if m.r != expected:
                raise ShapeError(path, f"module {name}: its factors have rank {m.r}, the config says r = {expected}")
    return Adapter(
        modules=modules,
        carried={k: tensors[k] for k in rest if k not in unknown},
        source_format="peft",
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        target_modules=config.get("target_modules"),
        modules_to_save=config.get("modules_to_save"),
        dtype=dtype_name(tensors),
        config=config,
        source=str(path),
    )


def target_modules_for(adapter: Adapter, names: list[str] | None = None):
    """The source's ``target_modules`` when it was PEFT, else the exact module names (always correct)."""
    if adapter.source_format in ("peft", "vblora") and adapter.target_modules:
        return adapter.target_modules
    return sorted(adapter.modules if names is None else names)


def lora_config(adapter: Adapter, modules: dict[str, LoraModule]) -> dict:
    """A PEFT ``LoraConfig`` dict for ``modules``; scale is written as ``lora_alpha = scale · r`` per module."""
    ranks = [m.r for m in modules.values()]
    r = max(set(ranks), key=ranks.count)
    # Keys are regexes to PEFT: escape the exact module names.
    rank_pattern = {re.escape(name): m.r for name, m in modules.items() if m.r != r}
    alphas = {name: m.scale * m.r for name, m in modules.items()}
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    alpha_pattern = {re.escape(name): a for name, a in alphas.items() if a != alpha}
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "target_modules": target_modules_for(adapter),
        "fan_in_fan_out": adapter.fan_in_fan_out(),
        "modules_to_save": adapter.modules_to_save,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": bool(adapter.config.get("use_dora")),
        "lora_bias": bool(adapter.config.get("lora_bias")),
    }


def write_peft_lora(adapter: Adapter, out: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write ``adapter``'s modules and carried tensors as a PEFT LoRA into the directory ``out``.

    ``dtype`` casts the factors (default: keep each tensor's dtype).
    """
    tensors = {}
    for name, m in adapter.modules.items():
        a, b = stored_factors(m, dtype)
        if m.kind == EMBEDDING:
            tensors[f"{PREFIX}{name}.lora_embedding_A"], tensors[f"{PREFIX}{name}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    tensors.update(adapter.carried)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out / "adapter_model.safetensors")
    write_json(out / "adapter_config.json", lora_config(adapter, adapter.modules))


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
        raise ShapeError(
            adapter.source, f"a PEFT adapter adapts one model; this LoRA spans {', '.join(components)} (write kohya or diffusers)"
        )
    return replace(adapter, modules={placed[n][1]: m for n, m in adapter.modules.items()}, target_modules=None)


def write(adapter: Adapter, out: Path, dtype: torch.dtype | None = None, name: str | None = None) -> Path:
    write_peft_lora(peft_named(adapter), out, dtype=dtype)
    return out / "adapter_model.safetensors"


FORMAT = Format("peft", detect, read, write)
