"""The codec seam: how one adapter's factors are held in a collection.

A codec turns an adapter's modules into tensors for its ``codes.safetensors`` plus a JSON table (the
module list and whatever the codec needs to decode), and back. The vector bank is one codec
(:mod:`.bank`); every codec answers the same four questions: what it stores (``hold``), how it
decodes (:meth:`Codec.decode`), what that costs in bytes (:meth:`Codec.stored_bytes`) and which tensors a
valid file holds (:meth:`Codec.check`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..adapter import LoraModule


class Codec(ABC):
    """One way of holding an adapter's modules; ``name`` is what a manifest entry records."""

    name: str
    peft_type: str  # what `unpack` writes it as: "VBLORA" (bank codes, as they are) or "LORA" (dense factors)

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor], table: dict, bank: torch.Tensor | None, topk: int) -> dict[str, LoraModule]:
        """Modules ``A: [r, in]``, ``B: [out, r]`` (scale folded) from what :meth:`hold` stored."""

    @abstractmethod
    def owns(self, key: str) -> bool:
        """Whether ``key`` in a codes file is one of the codec's own tensors (anything else is a carried head)."""

    def stored_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """Bytes of the codec's own tensors as stored."""
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if self.owns(k))

    @abstractmethod
    def check(self, tensors: dict[str, torch.Tensor], table: dict, path: Path, bank_shape: tuple[int, int], topk: int) -> None:
        """Raise :class:`~vbcompress.errors.FormatError` naming ``path`` unless ``tensors`` are exactly what
        :meth:`hold` writes for ``table``: dtypes, shapes, ranges, finite values."""
