"""The in-memory adapter model every command reads and writes.

A LoRA module is ``ΔW = scale · B @ A`` with ``A: [r, in]`` and ``B: [out, r]``, laid onto the base weight
transposed when the base stores it ``[in, out]`` (GPT-2 ``Conv1D``, ``fan_in_fan_out``) or is an embedding.
A VB-LoRA adapter keeps its vector bank and per-module top-k codes, and exposes the same A and B decoded.
Tensors that are not LoRA factors (heads in ``modules_to_save``, DoRA magnitudes) are carried verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .codec.layout import VectorBank, vb_stored_bytes
from .errors import ShapeError
from .linalg import balanced

LINEAR, EMBEDDING, CONV = "linear", "embedding", "conv"


def natural_key(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class LoraModule:
    """One adapted module. ``A: [r, in]`` (conv: ``[r, in·kh·kw]``), ``B: [out, r]``."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    fan_in_fan_out: bool = False
    kind: str = LINEAR
    kernel: tuple[int, ...] | None = None
    alpha: float | None = None
    _balanced: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def transposed(self) -> bool:
        """Whether ΔW is laid onto the base weight as ``[in, out]``."""
        return self.fan_in_fan_out or self.kind == EMBEDDING

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW in the base weight's layout (``[out, in]``, ``[in, out]`` or ``[out, in, kh, kw]``)."""
        delta = self.scale * (self.B.to(dtype) @ self.A.to(dtype))
        if self.kind == CONV and self.kernel is not None:
            return delta.reshape(self.out_features, -1, *self.kernel)
        return delta.T if self.transposed else delta

    def add_delta_(self, weight: torch.Tensor) -> torch.Tensor:
        """Add ΔW to ``weight`` (in the base weight's layout, any float dtype and device) in place, without
        forming ΔW apart."""
        b, a = (t.to(weight.device, weight.dtype) for t in self.folded())
        if self.kind == CONV and self.kernel is not None:
            weight.view(self.out_features, -1).addmm_(b, a)
        elif self.transposed:
            weight.addmm_(a.T, b.T)
        else:
            weight.addmm_(b, a)
        return weight

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in float32 with the scale folded in, so that ``ΔW = B @ A``."""
        return self.B.float() * self.scale, self.A.float()

    def balanced(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`~vbcompress.linalg.balanced` of the folded factors (``B' [out, rank]``, ``A' [rank, in]``, σ),
        computed once per module and sliced: a collection's floor search asks for many ranks of each module."""
        key = (self.A.data_ptr(), self.A._version, self.B.data_ptr(), self.B._version, self.scale)
        if self._balanced is None or self._balanced[0] != key:
            self._balanced = (key, balanced(*self.folded()))
        b, a, s = self._balanced[1]
        return (b, a, s) if rank is None else (b[:, :rank], a[:rank], s[:rank])


@dataclass
class Adapter:
    """An adapter of any supported format, as modules plus what is needed to write it back."""

    modules: dict[str, LoraModule]
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    source_format: str = "peft"
    base_model: str | None = None
    task_type: str | None = None
    target_modules: Any = None
    modules_to_save: list[str] | None = None
    dtype: str = "float32"
    config: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    vector_bank: VectorBank | None = None

    @property
    def num_lora_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    @property
    def num_carried_params(self) -> int:
        return sum(t.numel() for t in self.carried.values())

    def fan_in_fan_out(self) -> bool:
        """The one ``fan_in_fan_out`` of the adapter's non-embedding modules (PEFT and VB-LoRA store one per
        adapter); the config's when it holds codes only. Raises ShapeError when modules mix both layouts."""
        fan = {m.fan_in_fan_out for m in self.modules.values() if m.kind != EMBEDDING}
        if len(fan) > 1:
            raise ShapeError(self.source, "PEFT has one fan_in_fan_out per adapter; this one mixes both layouts")
        return fan.pop() if fan else bool(self.config.get("fan_in_fan_out"))

    @property
    def ranks(self) -> list[int]:
        return sorted({m.r for m in self.modules.values()})

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Module name → ΔW (scale included) in the layout of the base layer's weight."""
        return {name: m.delta_weight() for name, m in self.modules.items()}

    def stored_bytes(self) -> int:
        """Bytes of the adapter's own weights as stored (bank + codes for VB-LoRA; A and B for LoRA)."""
        if self.vector_bank is not None:
            return vb_stored_bytes(self.vector_bank)
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())

    def fp16_bytes(self) -> int:
        """Bytes of the LoRA factors at fp16: the denominator of every compression ratio."""
        return 2 * self.num_lora_params

    def carried_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.carried.values())
