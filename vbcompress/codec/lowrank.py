"""The low-rank codec: each module's top singular directions as balanced factors, stored at 16 bits (fp16)
or quantized to 2–8 bits in groups of 64 with one fp16 scale each, bit-packed.

This is the plain representation every report compares against (:mod:`vbcompress.baselines`), stored for
real: where it keeps more of an adapter than the bank at fewer bytes, a collection holds the adapter this way.
Tensors per module (``lowrank.<module>.<A|Bt>``): ``…levels`` (uint8, packed) and ``…scales`` (float16), or
``…fp16`` at 16 bits. ``A: [r, in]`` and ``Bᵀ: [r, out]`` row-major, scale folded: every direction's values
lie together, so a group of 64 never mixes directions of different size, and the top r' directions of a
stored module are its first r' rows on both sides (the ladder that prices every rank quantizes once).
Tables written before 0.2 (no ``"B_rows"``) hold ``lowrank.<module>.B: [out, r]`` row-major and decode as written;
the new side's own name makes an older reader refuse what it would misread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..adapter import LoraModule
from ..baselines import GROUP, dequantize, quantize_levels
from ..errors import FormatError
from .base import Codec

PREFIX = "lowrank."
BITS = (2, 3, 4, 8, 16)


def pack_bits(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed levels in ``[-(2^(b-1)-1), 2^(b-1)-1]`` → a little-endian bit stream of ``bits`` per value (uint8)."""
    u = (levels.to(torch.int64) + (2 ** (bits - 1) - 1)).numpy().astype(np.uint16)
    stream = ((u[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits).astype(np.int64)
    return torch.from_numpy((stream << np.arange(bits)).sum(1) - (2 ** (bits - 1) - 1))


def packed_bytes(values: int, bits: int) -> int:
    """Bytes one factor of ``values`` entries takes at ``bits``."""
    return 2 * values if bits == 16 else math.ceil(values * bits / 8) + 2 * math.ceil(values / GROUP)


class LowRankCodec(Codec):
    name = "lowrank"
    peft_type = "LORA"

    def owns(self, key: str) -> bool:
        return key.startswith(PREFIX)

    def hold(self, modules: dict[str, LoraModule], ranks: dict[str, int], bits: int) -> dict[str, torch.Tensor]:
        """Each module truncated to ``ranks[name]`` directions and stored at ``bits``."""
        out = {}
        for name, m in modules.items():
            b, a, _ = m.balanced(ranks[name])  # what baselines.truncated_factors stores
            for side, t in (("A", a), ("Bt", b.T)):
                key = f"{PREFIX}{name}.{side}"
                if bits == 16:
                    out[key + ".fp16"] = t.half().reshape(-1).contiguous()
                else:
                    levels, scales = quantize_levels(t, bits)
                    out[key + ".levels"], out[key + ".scales"] = pack_bits(levels, bits), scales.contiguous()
        return out

    def decode(self, tensors, table, bank, topk) -> dict[str, LoraModule]:
        bits, fan = int(table["bits"]), bool(table["fan_in_fan_out"])
        out = {}
        rows = bool(table.get("B_rows"))
        for name, fan_in, fan_out, rank in table["modules"]:
            sides = {}
            for side, shape in (("A", (rank, fan_in)), ("Bt", (rank, fan_out)) if rows else ("B", (fan_out, rank))):
                key = f"{PREFIX}{name}.{side}"
                if bits == 16:
                    sides[side] = tensors[key + ".fp16"].float().reshape(shape)
                else:
                    levels = unpack_bits(tensors[key + ".levels"], bits, shape[0] * shape[1])
                    sides[side] = dequantize(levels, tensors[key + ".scales"], shape)
            B = sides["Bt"].T.contiguous() if rows else sides["B"]
            out[name] = LoraModule(name=name, A=sides["A"], B=B, fan_in_fan_out=fan)
        return out

    def check(self, tensors, table, path: Path, bank_shape, topk) -> None:
        bits = table.get("bits")
        if not isinstance(table.get("B_rows", False), bool):
            raise FormatError(path, f"adapter table: B_rows must be true or false, not {table['B_rows']!r:.40}")
        if bits not in BITS:
            raise FormatError(path, f"low-rank codes at {bits!r} bits (this vbcompress reads {', '.join(map(str, BITS))})")
        expected = {}
        for name, fan_in, fan_out, rank in table["modules"]:
            for side, n in (("A", rank * fan_in), ("Bt" if table.get("B_rows") else "B", fan_out * rank)):
                key = f"{PREFIX}{name}.{side}"
                if bits == 16:
                    expected[key + ".fp16"] = (torch.float16, [n])
                else:
                    expected[key + ".levels"] = (torch.uint8, [math.ceil(n * bits / 8)])
                    expected[key + ".scales"] = (torch.float16, [math.ceil(n / GROUP)])
        own = {k: t for k, t in tensors.items() if self.owns(k)}
        if set(own) != set(expected):
            extra, missing = sorted(set(own) - set(expected)), sorted(set(expected) - set(own))
            raise FormatError(path, f"low-rank tensors do not match the module table (missing {missing[:2]}, unexpected {extra[:2]})")
        for key, (dtype, shape) in expected.items():
            t = own[key]
            if t.dtype != dtype or list(t.reshape(-1).shape) != shape:
                raise FormatError(path, f"{key} must be {dtype} with {shape[0]} values, not {t.dtype} {list(t.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError(path, f"{key} holds NaN or Inf")


LOWRANK = LowRankCodec()
