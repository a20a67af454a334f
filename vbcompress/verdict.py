"""One verdict, computed here for every command: what an output keeps against the best plain representation
at equal or fewer bytes (SVD truncation, factors at fp16, int8 or int4, each at its best rank), in ΔW error
and, where a base model measured both, in retention. When a plain representation keeps more, the verdict
says so first, names it, and gives the command that writes it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import torch

from .adapter import LoraModule
from .baselines import truncated_factors, truncation

# One set of thresholds for every command. ΔW error at or above KEEPS_NOTHING keeps almost nothing (1.0 is an
# empty adapter); at or above KEEPS_LITTLE, little. Retention below RETAINS_NOTHING / RETAINS_LITTLE likewise.
KEEPS_NOTHING, KEEPS_LITTLE = 0.9, 0.7
RETAINS_NOTHING, RETAINS_LITTLE = 0.1, 0.5
PLAIN_BITS = (16, 8, 4)


@dataclass
class Plain:
    """The best plain representation within a byte budget: truncated factors at ``bits``."""

    bits: int
    rank: int
    bytes: int
    rel_error: float
    retention: float | None = None

    @property
    def name(self) -> str:
        return f"{'fp16' if self.bits == 16 else f'int{self.bits}'} factors of rank {self.rank}"

    def deltas(self, modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
        """Module → ΔW of ``modules`` held this way (in the base weight's layout), to measure its retention."""
        out = {}
        for name, m in modules.items():
            b, a = truncated_factors(m, min(self.rank, m.r), self.bits)
            out[name] = replace(m, B=b, A=a, scale=1.0).delta_weight()
        return out


@dataclass
class Verdict:
    """``kind``: "ours" (the output keeps the most for its bytes), "plain" (a plain representation keeps more),
    "nothing" (the output keeps almost nothing and no plain representation fits its bytes either)."""

    kind: str
    line: str
    rel_error: float | None
    retention: float | None
    bytes: int
    plain: Plain | None
    command: str | None = None
    keeps: str = "much"  # "much", "little" or "nothing", by the thresholds above

    def to_json(self) -> dict:
        return asdict(self)


def best_plain(modules: Iterable[LoraModule], budget: int) -> Plain | None:
    """The lowest-error truncation whose factors fit in ``budget`` bytes at fp16, int8 or int4; None when
    not even rank 1 fits."""
    modules = list(modules)
    found = [t for bits in PLAIN_BITS if (t := truncation(modules, budget, bits)).rank > 0]
    if not found:
        return None
    t = min(found, key=lambda t: (t.rel_error, t.bytes))
    return Plain(bits=t.bits, rank=t.rank, bytes=t.bytes, rel_error=t.rel_error)


def how_much(rel_error: float | None, retention: float | None) -> str:
    if retention is not None:
        return "nothing" if retention < RETAINS_NOTHING else "little" if retention < RETAINS_LITTLE else "much"
    if rel_error is None:
        return "much"
    return "nothing" if rel_error >= KEEPS_NOTHING else "little" if rel_error >= KEEPS_LITTLE else "much"


def command_for(plain: Plain, src: str) -> str:
    """The command that writes ``plain``: ``resize`` for fp16 factors, a low-rank collection entry otherwise."""
    if plain.bits == 16:
        return f"vbcompress resize {src} -o OUT --rank {plain.rank}"
    return f"vbcompress pack {src} -o OUT --hold lowrank --max-error {plain.rel_error + 0.0005:.3f}"


def judge(
    what: str,
    modules: Iterable[LoraModule],
    stored_bytes: int,
    rel_error: float | None,
    retention: float | None = None,
    plain: Plain | None = None,
    src: str = "SRC",
) -> Verdict:
    """The verdict on ``what`` (e.g. "this VB-LoRA adapter"), stored in ``stored_bytes`` with ``rel_error``
    (and ``retention`` where measured) against the source ``modules``. ``plain``: the best plain
    representation, with its retention measured on the same inputs (default: :func:`best_plain`, ΔW only)."""
    if rel_error is None:  # the source's ΔW is zero (PEFT saves lora_B = 0 untrained): no error, no effect to retain
        line = f"the adapter's ΔW is zero (saved untrained?): there is nothing for {what} to keep"
        return Verdict("ours", line, None, retention, stored_bytes, None, None, "much")
    plain = plain or best_plain(modules, stored_bytes)
    keeps = how_much(rel_error, retention)
    ours = f"ΔW error {rel_error:.3f}"
    if retention is not None:
        ours += f", retention {retention:.3f}"
    if plain is not None:
        by_retention = retention is not None and plain.retention is not None
        better = plain.retention > retention if by_retention else plain.rel_error < rel_error
        theirs = f"ΔW error {plain.rel_error:.3f}" + (f", retention {plain.retention:.3f}" if plain.retention is not None else "")
        if better:
            command = command_for(plain, src)
            line = f"{plain.name} keep more of this adapter in fewer bytes ({theirs}; {what}: {ours}): {command}"
            return Verdict("plain", line, rel_error, retention, stored_bytes, plain, command, keeps)
        line = f"{what} keeps at least as much as any plain truncation in its bytes ({ours}; the best, {plain.name}: {theirs})"
        return Verdict("ours", line, rel_error, retention, stored_bytes, plain, None, keeps)
    if keeps == "nothing":
        line = f"{what} keeps almost nothing of the adapter ({ours}), and no plain truncation fits its bytes: give it more bytes"
        return Verdict("nothing", line, rel_error, retention, stored_bytes, None, None, keeps)
    line = f"{what} keeps {ours} where no plain truncation fits its bytes"
    return Verdict("ours", line, rel_error, retention, stored_bytes, None, None, keeps)
