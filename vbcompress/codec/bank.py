"""The vector-bank codec: every sub-vector a top-k mixture of the collection's one bank.

Stored per adapter as one table of all its sub-vectors, module by module in PEFT's tiling (A's, then B's):
``indices: [S, k]`` (the smallest integer type below N) and ``weights: [S, k-1]`` float16, rounded toward
zero so a row never sums past 1; the k-th weight is ``1 − Σ`` others, as PEFT restores it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import LoraModule
from ..errors import FormatError
from .base import Codec
from .layout import VBCode, code_of, decode, half_stored, module_subvectors, restored_weights, stored_index_dtype


class BankCodec(Codec):
    name = "bank"
    peft_type = "VBLORA"

    def owns(self, key: str) -> bool:
        return key in ("indices", "weights")

    def hold(self, codes: dict[str, VBCode], topk: int, num_vectors: int) -> dict[str, torch.Tensor]:
        """``codes`` laid out as stored: one ``indices`` and one ``weights`` table for all modules."""
        parts_idx, parts_w = [], []
        for code in codes.values():
            for idx, w in ((code.indices_A, code.weights_A), (code.indices_B, code.weights_B)):
                i, h = half_stored(idx, w)
                parts_idx.append(i.reshape(-1, topk))
                parts_w.append(h.reshape(-1, topk - 1))
        indices = torch.cat(parts_idx).to(stored_index_dtype(num_vectors))
        weights = torch.cat(parts_w) if topk > 1 else torch.zeros(indices.shape[0], 0, dtype=torch.float16)
        return {"indices": indices, "weights": weights}

    def size(self, codes: dict[str, VBCode], topk: int, num_vectors: int) -> int:
        """Bytes :meth:`hold` stores ``codes`` in, without building them: per sub-vector k indices and k−1 weights."""
        index = torch.empty(0, dtype=stored_index_dtype(num_vectors)).element_size()
        return sum(c.subvectors for c in codes.values()) * (topk * index + (topk - 1) * 2)

    def codes(self, tensors: dict[str, torch.Tensor], table: dict, length: int) -> dict[str, VBCode]:
        """Each module's :class:`VBCode` (weights restored as PEFT restores them), without decoding."""
        indices, weights, rank = tensors["indices"].long(), restored_weights(tensors["weights"].float()), int(table["rank"])
        codes, start = {}, 0
        for name, fan_in, fan_out in table["modules"]:
            n = module_subvectors(rank, fan_in, fan_out, length)
            codes[name] = code_of(indices[start : start + n], weights[start : start + n], rank, fan_in, fan_out, length)
            start += n
        return codes

    def decode(self, tensors, table, bank, topk) -> dict[str, LoraModule]:
        return self.modules_of(self.codes(tensors, table, bank.shape[1]), table, bank)

    def modules_of(self, codes: dict[str, VBCode], table: dict, bank: torch.Tensor) -> dict[str, LoraModule]:
        """Each module's factors decoded from its codes, exactly as PEFT decodes them."""
        fan = bool(table["fan_in_fan_out"])
        out = {}
        for name, code in codes.items():
            a, b = decode(bank, code)
            out[name] = LoraModule(name=name, A=a, B=b, fan_in_fan_out=fan)
        return out

    def check(self, tensors, table, path: Path, bank_shape: tuple[int, int], topk: int) -> None:
        n, length = bank_shape
        for key in ("indices", "weights"):
            if key not in tensors:
                raise FormatError(path, f"codes file without its {key!r} tensor")
        indices, weights = tensors["indices"], tensors["weights"]
        rows = sum(module_subvectors(int(table["rank"]), i, o, length) for _, i, o in table["modules"])
        if indices.is_floating_point() or indices.dtype == torch.bool or list(indices.shape) != [rows, topk]:
            raise FormatError(path, f"indices must be integers of shape [{rows}, {topk}], not {indices.dtype} {list(indices.shape)}")
        if weights.dtype != torch.float16 or list(weights.shape) != [rows, topk - 1]:
            raise FormatError(path, f"weights must be float16 of shape [{rows}, {topk - 1}], not {weights.dtype} {list(weights.shape)}")
        if rows and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise FormatError(path, f"an index is outside the bank of {n} vectors")
        w = weights.float()
        if not torch.isfinite(w).all() or (w < 0).any() or (w.sum(-1) > 1).any():
            raise FormatError(path, "mixture weights must be finite, non-negative and sum to at most 1 per row")


BANK = BankCodec()
