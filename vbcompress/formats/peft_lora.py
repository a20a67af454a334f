"""PEFT LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a legacy ``adapter_model.bin``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..adapter import EMBEDDING, Adapter, LoraModule
from ..files import save_tensors, write_json
from ..errors import FormatError, ShapeError
from .common import build_modules, dtype_name, match_keys, pattern_value, peft_scale, reject_unknown, stored_factors

PREFIX = "base_model.model."
RULES = [
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_A\.weight$"), "down"),
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_B\.weight$"), "up"),
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_embedding_A$"), "down_emb"),
    (re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_embedding_B$"), "up_emb"),
]
# Parts of a LoRA that are not factors but must travel with it: DoRA magnitudes, LoRA biases.
CARRIED_LORA_PARTS = re.compile(r"\.(lora_magnitude_vector(\.weight)?|lora_B\.bias)$")


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
