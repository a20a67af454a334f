"""Compact VB-LoRA adapters inside a PEFT model: keep each sub-vector's top-k logits and bank indices
instead of PEFT's full ``[..., N]`` logits.

PEFT loads a VB-LoRA adapter by expanding its saved top-k into full logits (the rest ``-inf``): at N=256 and
k=2 that is 128 floats where 2 floats and 2 indices carry the same adapter. PEFT's layer then takes the top-k
of those logits on every forward. Here the layer keeps only what that top-k returns, in the same order, and
computes the same softmax mixture, so its outputs are PEFT's own. Inference only: a compacted adapter cannot
be trained or saved with ``save_pretrained`` (its logits are no longer PEFT's shape).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

COMPACT = "_vbcompress_compact"  # per layer: adapter name → names of its four buffers (top-k logits and indices, A and B)


def _compact_lora_matrices(self, adapter, cast_to_fp32=False):
    """PEFT's ``VBLoRALayer._get_lora_matrices`` for a compacted adapter (the class's own for the others)."""
    held = getattr(self, COMPACT)
    if adapter not in held:
        return type(self)._get_lora_matrices(self, adapter, cast_to_fp32)
    bank = self.vblora_vector_bank[adapter]
    logits_a, idx_a, logits_b, idx_b = (getattr(self, f"{COMPACT}_{adapter}_{part}") for part in held[adapter])
    if cast_to_fp32:
        logits_a, logits_b, bank = logits_a.float(), logits_b.float(), bank.float()
    bank = bank.to(logits_a.device)

    def mixed(logits, idx):
        return (F.softmax(logits, dim=-1).unsqueeze(-1) * bank[idx.long()]).sum(-2)

    A = mixed(logits_a, idx_a).reshape(logits_a.shape[0], -1)  # (r, in_tile, L) → (r, in)
    B = mixed(logits_b, idx_b).transpose(1, 2).reshape(-1, logits_b.shape[1])  # (out_tile, r, L) → (out, r)
    return A, B


def compact_adapter(peft_model, adapter: str) -> int:
    """Compact ``adapter`` in every VB-LoRA layer of ``peft_model`` in place; returns the bytes freed."""
    from peft.tuners.vblora.layer import VBLoRALayer

    freed = 0
    for layer in peft_model.modules():
        if not isinstance(layer, VBLoRALayer) or adapter not in layer.vblora_logits_A:
            continue
        if not hasattr(layer, COMPACT):
            setattr(layer, COMPACT, {})
            layer._get_lora_matrices = types.MethodType(_compact_lora_matrices, layer)
        k, parts = layer.topk[adapter], []
        for side in ("A", "B"):
            full = getattr(layer, f"vblora_logits_{side}")[adapter]
            with torch.no_grad():
                values, idx = full.topk(k, dim=-1)  # the top-k PEFT's forward takes, in its order
            small = idx.to(torch.int16 if full.shape[-1] <= 1 << 15 else torch.int32)
            for part, tensor in ((f"logits_{side}", values.contiguous()), (f"indices_{side}", small.contiguous())):
                layer.register_buffer(f"{COMPACT}_{adapter}_{part}", tensor, persistent=False)
                parts.append(part)
            freed += full.numel() * full.element_size() - values.numel() * values.element_size() - small.numel() * small.element_size()
            # PEFT's forward and merge ask this dict for the adapter's name, device and dtype: a
            # one-element stand-in answers them without the [.., N] tensor.
            getattr(layer, f"vblora_logits_{side}")[adapter] = torch.nn.Parameter(full.new_zeros(1), requires_grad=False)
        getattr(layer, COMPACT)[adapter] = parts
    if not freed:
        raise ValueError(f"no VB-LoRA layer holds an adapter named {adapter!r}")
    return freed
