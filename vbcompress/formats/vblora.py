"""PEFT VB-LoRA: one vector bank ``[N, L]`` and per-module logits, full or in the compact top-k layout
(the code layout itself lives in :mod:`vbcompress.codec.layout`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, natural_key
from ..codec.layout import MIN_WEIGHT, VBCode, VectorBank, compact_weights, index_dtype, restored_weights
from ..errors import FormatError, ShapeError
from ..files import save_tensors, write_json
from .common import Format, Found, dtype_name, reject_unknown
from .peft_lora import PREFIX, peft_config, target_modules_for

BANK_KEY = "base_model.vblora_vector_bank"
LOGITS = re.compile(r"^base_model\.model\.(?P<name>.+)\.vblora_logits_(?P<side>[AB])(?P<part>_topk_indices|_topk_weights)?$")


def detect(keys: list[str]) -> bool:
    return any("vblora_vector_bank" in k or ".vblora_logits_" in k for k in keys)


def read(found: Found) -> Adapter:
    return read_vblora(found.tensors, peft_config(found, "VBLORA"), found.weights)


def read_vblora(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> Adapter:
    """Build an :class:`Adapter` (with its :class:`VectorBank`) from a PEFT VB-LoRA state dict."""
    if BANK_KEY not in tensors:
        raise FormatError(path, f"VB-LoRA file without {BANK_KEY}")
    bank = tensors[BANK_KEY]
    n, length = bank.shape if bank.dim() == 2 else (None, None)
    if n is None or n != config.get("num_vectors", n) or length != config.get("vector_length", length):
        raise ShapeError(
            path,
            f"vector bank has shape {list(bank.shape)}, config says [{config.get('num_vectors')}, {config.get('vector_length')}]",
        )
    topk = int(config.get("topk", 2))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    carried, unknown = {}, []
    for key, t in tensors.items():
        m = LOGITS.match(key)
        if m:
            parts.setdefault(m["name"], {})[m["side"] + (m["part"] or "")] = t
        elif "vblora" in key and key != BANK_KEY:
            unknown.append(key)
        elif key != BANK_KEY:
            carried[key] = t
    reject_unknown(path, unknown, "VB-LoRA")
    if not parts:
        raise FormatError(path, "no vblora_logits tensors found")
    vb = VectorBank(bank=bank, topk=topk)
    modules = {}
    for name, p in sorted(parts.items(), key=lambda kv: natural_key(kv[0])):
        code = VBCode(*_side_code(p, "A", name, vb, path), *_side_code(p, "B", name, vb, path))
        vb.codes[name] = code
        a, b = vb.decode(name)
        if a.shape[0] != b.shape[1]:
            raise ShapeError(path, f"module {name}: rank mismatch between logits_A ({a.shape[0]}) and logits_B ({b.shape[1]})")
        if config.get("r") is not None and a.shape[0] != config["r"]:
            raise ShapeError(path, f"module {name}: its codes have rank {a.shape[0]}, the config says r = {config['r']}")
        modules[name] = LoraModule(name=name, A=a, B=b, scale=1.0, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    return Adapter(
        modules=modules,
        carried=carried,
        source_format="vblora",
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        target_modules=config.get("target_modules"),
        modules_to_save=config.get("modules_to_save"),
        dtype=dtype_name({BANK_KEY: bank}),
        config=config,
        source=str(path),
        vector_bank=vb,
    )


def _side_code(p: dict, side: str, name: str, vb: VectorBank, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if side in p:
        if not p[side].is_floating_point() or p[side].dim() != 3:
            raise FormatError(
                path, f"module {name}: vblora_logits_{side} must be 3-D floating logits, not {p[side].dtype} {list(p[side].shape)}"
            )
        logits = p[side].float()
        if logits.shape[-1] != vb.num_vectors:
            raise ShapeError(path, f"module {name}: logits_{side} last dim {logits.shape[-1]} != num_vectors {vb.num_vectors}")
        top, idx = logits.topk(vb.topk, dim=-1)
        return idx, torch.softmax(top, dim=-1)
    if side + "_topk_indices" not in p or side + "_topk_weights" not in p:
        raise FormatError(path, f"module {name}: vblora_logits_{side} (full or top-k) missing")
    idx, stored = p[side + "_topk_indices"], p[side + "_topk_weights"]
    if idx.is_floating_point() or idx.dtype == torch.bool or not stored.is_floating_point() or idx.dim() != 3:
        raise FormatError(path, f"module {name}: top-k indices must be 3-D integers and weights floating, not {idx.dtype}/{stored.dtype}")
    idx = idx.long()
    if idx.shape[-1] != vb.topk or stored.shape[-1] != vb.topk - 1 or idx.shape[:-1] != stored.shape[:-1]:
        raise ShapeError(path, f"module {name}: top-k tensors of shape {list(idx.shape)}/{list(stored.shape)} do not fit topk={vb.topk}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= vb.num_vectors):
        raise FormatError(path, f"module {name}: top-k index out of range for a bank of {vb.num_vectors} vectors")
    if not torch.isfinite(stored).all() or (stored < 0).any() or (stored.float().sum(-1) > 1 + 1e-6).any():
        raise FormatError(path, f"module {name}: stored top-k weights sum to more than 1")
    return idx, restored_weights(stored)


def vblora_config(adapter: Adapter, vb: VectorBank, full_logits: bool) -> dict:
    """PEFT's ``VBLoRAConfig`` for ``vb``: the rank is read from the codes, ``fan_in_fan_out`` from the
    adapter's modules (or its config when it carries codes only)."""
    ranks = {c.indices_A.shape[0] for c in vb.codes.values()}
    if len(ranks) != 1:
        raise ShapeError(adapter.source, f"VB-LoRA needs one rank for all modules, not {sorted(ranks)}")
    return {
        "peft_type": "VBLORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": ranks.pop(),
        "num_vectors": vb.num_vectors,
        "vector_length": vb.vector_length,
        "topk": vb.topk,
        "target_modules": target_modules_for(adapter, list(vb.codes)),
        "save_only_topk_weights": not full_logits,
        "fan_in_fan_out": adapter.fan_in_fan_out(),
        "vblora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": adapter.modules_to_save,
        "init_vector_bank_bound": 0.0,
        "init_logits_std": 0.1,
        "inference_mode": True,
    }


def vblora_tensors(vb: VectorBank, full_logits: bool = False) -> dict[str, torch.Tensor]:
    """The state dict PEFT expects: compact top-k layout, or full logits (finite, so the adapter can be trained on)."""
    tensors = {BANK_KEY: vb.bank.contiguous()}
    idx_dtype = index_dtype(vb.num_vectors)
    for name, code in vb.codes.items():
        for side, idx, w in (("A", code.indices_A, code.weights_A), ("B", code.indices_B, code.weights_B)):
            key = f"{PREFIX}{name}.vblora_logits_{side}"
            if (idx.sort(-1).values.diff(dim=-1) == 0).any():
                raise FormatError(name, f"top-k indices of logits_{side} repeat within a row")
            if full_logits:
                logw = w.double().clamp_min(MIN_WEIGHT).log()
                floor = logw.min(-1, keepdim=True).values - 30
                full = floor.expand(*idx.shape[:-1], vb.num_vectors).clone()
                tensors[key] = full.scatter(-1, idx.long(), logw).float()
            else:
                # the largest weight restored as 1 − Σ others (PEFT reads any order): exact where float32 is coarsest
                sorted_idx, stored = compact_weights(w, idx, descending=False)
                tensors[key + "_topk_indices"] = sorted_idx.to(idx_dtype)
                tensors[key + "_topk_weights"] = stored
    return tensors


def write_vblora(adapter: Adapter, out: str | os.PathLike, full_logits: bool = False) -> None:
    """Write ``adapter.vector_bank`` and carried tensors as a PEFT VB-LoRA adapter into ``out``."""
    vb = adapter.vector_bank
    if vb is None:
        raise FormatError(adapter.source, "adapter has no vector bank to write")
    config = vblora_config(adapter, vb, full_logits)
    tensors = vblora_tensors(vb, full_logits)
    tensors.update(adapter.carried)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out / "adapter_model.safetensors")
    write_json(out / "adapter_config.json", config)


FORMAT = Format("vblora", detect, read)  # written by lora2vb (write_vblora), never as a dense LoRA
