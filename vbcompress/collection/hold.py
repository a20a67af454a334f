"""How each adapter of a collection is held: the quality floor, and the fewest bytes that meet it.

Every adapter is held to a floor (:class:`~vbcompress.settings.QualitySettings`): KL retention on held-out
text with a base model, ΔW error without one. Two representations compete (three ways), cheapest first:

- **bank codes** at rank r' (the adapter's top r' singular directions, one rank for all modules, as PEFT's
  VB-LoRA requires): the codes of the full-rank fit sliced to their first r' directions (the fit works in
  the balanced gauge, directions in σ order), calibrated on the base model when one is given;
- **bank codes against a grown bank** (``add`` only, where the codes above miss): G new vectors fitted to what
  the bank leaves unexplained, appended for this adapter, G = 8, 16, 32 … while codes plus vectors cost less
  than the low-rank factors that meet the floor; the largest tried first, then bisected;
- **low-rank factors**: the top directions of every module stored at 16, 8, 4, 3 or 2 bits (the plain
  representation every report compares against), on the Pareto front of bytes against ΔW error.

The low-rank ladder is searched first (cheap to score), from its cheapest rung, which bounds what bank codes may
cost; bank ranks below that bound are searched from the largest down, so a bank that misses at its best rank costs
one try. Calibrated codes are trained in full (``CalibrationSettings.code_steps``) at that largest rank only; rank 1
is tried next (where the bank has its ground: when it meets, two calibrations decide), then the ranks between,
bisected. Each of those starts from the calibrated codes of the nearest higher rank already tried, sliced, and
trains for a few steps (``CalibrationSettings.warm_steps``, without the gradient start): measured to keep about as
much as a full calibration from the weight fit (−0.012 to +0.021 KL retention at ranks 1–5 of two Gemma adapters),
at a quarter of its steps.
Along both ladders quality is assumed to grow with bytes (true of ΔW error; measured, not proven, for KL):
the search bisects. What was tried is recorded with the adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..adapter import Adapter, LoraModule
from ..codec.bank import BANK
from ..codec.layout import VBCode
from ..codec.lowrank import LOWRANK
from ..errors import SettingError
from ..metrics import measure
from ..retention import Probe
from ..settings import QualitySettings
from ..units import held_name
from ..verdict import Verdict, best_plain
from ..verdict import judge as verdict_of
from .ladder import Tried, front_of, lowrank_grid, plain_within


@dataclass
class Holding:
    """The representation chosen for an adapter: the codec's tensors and table, what it keeps, what was tried."""

    codec: str
    tensors: dict[str, torch.Tensor]
    table: dict
    modules: dict[str, LoraModule]  # decoded exactly as stored
    chosen: Tried
    tried: list[Tried] = field(default_factory=list)
    errors: dict = field(default_factory=dict)  # per-module ΔW errors of the stored representation
    calibrated: bool = False
    verdict: Verdict | None = None
    vectors: torch.Tensor | None = None  # a grown bank: the rows ``[G, L]`` (as the bank stores them) the codes' top indices name


@dataclass
class Growth:
    """Growing the bank for one adapter: ``fit(rank, G)`` → (codes of its top ``rank`` directions against the bank
    with G new rows, those rows as the bank stores them), fitted to what the bank leaves unexplained (and calibrated
    with a base); ``vector_bytes`` one stored row; ``most`` the largest G tried."""

    fit: Callable[[int, int], tuple[dict[str, VBCode], torch.Tensor]]
    vector_bytes: int
    most: int


@dataclass
class Calibrate:
    """Training sliced bank codes on the base: ``train(codes, short)`` → the trained codes, a short run when ``codes``
    are a higher rank's trained codes, sliced. ``warm``: the search starts a rank below one already calibrated that
    way (otherwise every rank starts from its weight fit, in full)."""

    train: Callable[[dict[str, VBCode], bool], dict[str, VBCode]]
    warm: bool = False


GROW_FROM = 8  # the smallest growth tried; each next one doubles
# Nor fewer vectors than 1/GROW_SHARE of the sub-vectors they would serve: unless an adapter's sub-vectors cluster,
# growth needs about a sixth of them to keep half (ner-r8 at rank 1, 720 sub-vectors: 128 new vectors keep 0.517
# KL retention weight-only, 512 keep 0.973), and a fit for a handful among 100k (a 7B adapter) buys nothing.
GROW_SHARE = 32


class Judge:
    """Scores a stored representation of ``source`` against the floor: ΔW error always, retention on held-out
    text (``probe``) when the floor is one."""

    def __init__(self, source: Adapter, quality: QualitySettings, probe: Probe | None = None):
        self.source, self.probe = source, probe
        self.kind, self.value = quality.floor(probe is not None)
        self.setting = "min_kl_retention" if self.kind == "retention" else "max_error"

    def describe(self) -> str:
        return f"{'retention' if self.kind == 'retention' else 'ΔW error'} {'≥' if self.kind == 'retention' else '≤'} {self.value:g}"

    def score(self, tried: Tried, modules: dict[str, LoraModule]) -> Tried:
        """``tried`` with what ``modules`` keep filled in (their per-module ΔW errors left in ``self.errors``)."""
        total, self.errors, _ = measure(self.source, Adapter(modules=modules, source=self.source.source))
        tried.rel_error = total
        if self.probe is not None:
            deltas = {n: m.delta_weight() for n, m in modules.items()}
            tried.retention = self.probe.measure(deltas).headline
            if tried.retention is None:
                # the source does nothing on these texts (an untrained adapter, B = 0): kept exactly by a representation
                # that does nothing either, as a ΔW floor keeps a zero ΔW, and by nothing else
                tried.met = not any(bool(d.any()) for d in deltas.values())
                return tried
        tried.met = self.meets(tried)
        return tried

    def meets(self, t: Tried) -> bool:
        if self.kind == "retention":
            return t.retention is not None and t.retention >= self.value
        return t.rel_error is None or t.rel_error <= self.value


def hold_lowrank(source: Adapter, rank: int, bits: int, per_module: list[int] | None = None) -> tuple[dict, dict]:
    """``source``'s top directions stored at ``bits``: ``rank`` for every module, or ``per_module`` ranks in module order."""
    if per_module is not None:
        ranks = dict(zip(source.modules, per_module, strict=True))
    else:
        ranks = {n: min(rank, m.r) for n, m in source.modules.items()}
    table = {
        "codec": LOWRANK.name,
        "bits": bits,
        "B_rows": True,  # Bᵀ stored row-major (see codec.lowrank)
        "rank": rank,
        "fan_in_fan_out": source.fan_in_fan_out(),
        "modules": [[n, m.in_features, m.out_features, ranks[n]] for n, m in source.modules.items()],
    }
    return LOWRANK.hold(source.modules, ranks, bits), table


def sliced(codes: dict[str, VBCode], rank: int) -> dict[str, VBCode]:
    """Codes of the top ``rank`` directions: the first rows of A's codes, the first columns of B's."""
    return {n: VBCode(c.indices_A[:rank], c.weights_A[:rank], c.indices_B[:, :rank], c.weights_B[:, :rank]) for n, c in codes.items()}


def hold_bank(source: Adapter, codes: dict[str, VBCode], bank: torch.Tensor, topk: int) -> tuple[dict, dict]:
    table = {
        "codec": BANK.name,
        "rank": next(iter(codes.values())).rank,
        "fan_in_fan_out": source.fan_in_fan_out(),
        "modules": [[n, m.in_features, m.out_features] for n, m in source.modules.items()],
    }
    return BANK.hold(codes, topk, bank.shape[0]), table


def first_met(n: int, attempt: Callable[[int], Tried], order: str = "top") -> int | None:
    """Smallest i in [0, n) whose attempt meets the floor, bisecting (quality assumed to grow with i).

    ``order`` says what is tried before the bisection: ``top``, the largest, so that a ladder that misses
    everywhere costs one attempt; ``cheapest``, the smallest and then the largest, so that a ladder whose first
    rung meets costs one (the low-rank ladder with a base); ``top-cheapest``, the largest and then the smallest
    (calibrated bank codes: the largest is the one full training run, the others start from it, and rank 1
    meets most floors that any rank below the largest meets).
    """
    if order not in ("top", "cheapest", "top-cheapest"):
        raise ValueError(f"unknown search order {order!r}")
    if n == 0:
        return None
    if order == "cheapest":
        if attempt(0).met:
            return 0
        if n == 1:
            return None
    if not attempt(n - 1).met:
        return None
    if order == "top-cheapest" and n > 1 and attempt(0).met:
        return 0
    lo, hi = (0 if order == "top" else 1), n - 1  # hi meets
    while lo < hi:
        mid = (lo + hi) // 2
        if attempt(mid).met:
            hi = mid
        else:
            lo = mid + 1
    return hi


def choose(
    name: str,
    source: Adapter,
    judge: Judge,
    quality: QualitySettings,
    bank: tuple[torch.Tensor, int, dict[str, VBCode]] | None,
    calibrate: Calibrate | None = None,
    growth: Growth | None = None,
) -> Holding:
    """The cheapest representation of ``source`` that meets ``judge``'s floor (see the module docstring).

    ``bank``: (bank ``[N, L]``, k, full-rank codes) when bank codes may compete; ``calibrate`` trains sliced
    codes on the base model; ``growth`` may add vectors to the bank where its codes alone miss. Raises
    SettingError (naming the floor's setting) when nothing within the adapter's own fp16 size meets it.
    """
    if not any(bool(m.balanced()[2].any()) for m in source.modules.values()):
        # a zero ΔW (PEFT saves lora_B = 0 untrained): codes mix bank vectors, so they would add an effect, and vectors
        # grown for it would be zeros in the shared bank; the cheapest plain factors hold it exactly
        if quality.hold == "bank":
            raise SettingError(
                "hold",
                f"adapter {name!r}: its ΔW is zero (saved untrained?), which bank codes cannot hold without adding an effect; "
                "plain factors hold it exactly ({setting} auto or lowrank)",
                where=source.source,
            )
        bank = growth = None
    tried: list[Tried] = []
    held: dict[tuple, tuple] = {}
    calibrated: dict[int, dict[str, VBCode]] = {}  # bank rank → its trained codes

    def attempt_lowrank(t: Tried) -> Tried:
        key = t.key
        if key not in held:
            tensors, table = hold_lowrank(source, t.rank, t.bits, t.ranks)
            modules = LOWRANK.decode(tensors, table, None, 0)
            score = judge.score(Tried("lowrank", t.rank, t.bits, LOWRANK.stored_bytes(tensors), None, ranks=t.ranks), modules)
            tried.append(score)
            held[key] = (tensors, table, modules, score, None, judge.errors)
        return held[key][3]

    def attempt_bank(r: int) -> Tried:
        if ("bank", r) not in held:
            vectors, topk, codes = bank
            trial, above = sliced(codes, r), None
            if calibrate is not None:
                # the nearest higher rank's trained codes already know what this adapter does: a short run from them
                above = min((q for q in calibrated if q > r), default=None) if calibrate.warm else None
                trial = calibrate.train(trial if above is None else sliced(calibrated[above], r), above is not None)
                calibrated[r] = trial
            tensors, table = hold_bank(source, trial, vectors, topk)
            modules = BANK.decode(tensors, table, vectors, topk)
            score = judge.score(Tried("bank", r, None, BANK.stored_bytes(tensors), None, warm_from=above), modules)
            tried.append(score)
            held[("bank", r)] = (tensors, table, modules, score, None, judge.errors)
        return held[("bank", r)][3]

    def attempt_grown(r: int, g: int) -> Tried:
        if ("grown", r, g) not in held:
            vectors, topk, _ = bank
            codes, new = growth.fit(r, g)
            grown = torch.cat([vectors, new.float()])
            tensors, table = hold_bank(source, codes, grown, topk)
            modules = BANK.decode(tensors, table, grown, topk)
            cost = BANK.stored_bytes(tensors) + new.numel() * new.element_size()
            score = judge.score(Tried("bank", r, None, cost, None, vectors=g), modules)
            tried.append(score)
            held[("grown", r, g)] = (tensors, table, modules, score, new, judge.errors)
        return held[("grown", r, g)][3]

    cap = source.fp16_bytes()
    best_low, grid = None, None
    if quality.hold in ("auto", "lowrank"):
        grid = lowrank_grid(source)
        front = [t for t in front_of(grid) if t.bytes <= cap]
        if judge.kind == "error":  # exact already: no need to bisect
            hit = next((i for i, t in enumerate(front) if judge.meets(t)), None)
        else:
            # cheapest first: with a base, the cheapest rung meets the default floor on every trained adapter of the Gemma
            # family (int2 rank 1 keeps 0.69–0.93 KL retention), where a bisection from the top scores ~9 rungs
            hit = first_met(len(front), lambda i: attempt_lowrank(front[i]), order="cheapest")
        best_low = attempt_lowrank(front[hit]) if hit is not None else None

    best_bank = None
    if bank is not None and quality.hold in ("auto", "bank"):
        vectors, topk, codes = bank
        top = next(iter(codes.values())).rank
        cost = [BANK.size(sliced(codes, r), topk, vectors.shape[0]) for r in range(1, top + 1)]
        ranks = [r for r in range(1, top + 1) if best_low is None or cost[r - 1] < best_low.bytes]
        hit = first_met(len(ranks), lambda i: attempt_bank(ranks[i]), order="top" if calibrate is None else "top-cheapest")
        best_bank = held[("bank", ranks[hit])][3] if hit is not None else None

    best_grown = None
    if growth is not None and bank is not None and best_bank is None and quality.hold in ("auto", "bank"):
        # The bank's codes miss: vectors fitted to what it leaves unexplained are appended for this adapter, if
        # codes plus vectors cost less than what meets the floor otherwise. At the rank plain factors needed.
        vectors, topk, codes = bank
        r = growth_rank(source, judge, best_low, top)
        bound = best_low.bytes if best_low is not None else cap + 1
        sizes, g, trial = [], GROW_FROM, sliced(codes, r)
        least = sum(c.subvectors for c in trial.values()) / GROW_SHARE
        while g <= growth.most:
            cost = BANK.size(trial, topk, vectors.shape[0] + g) + g * growth.vector_bytes
            if cost >= bound:
                break
            if g >= least:
                sizes.append(g)
            g *= 2
        # the largest first: where growth misses (the common case, measured) it costs one fit or calibration
        hit = first_met(len(sizes), lambda i: attempt_grown(r, sizes[i]))
        best_grown = held[("grown", r, sizes[hit])][3] if hit is not None else None

    chosen = best_bank or best_grown or best_low
    if chosen is None:
        closest = max(tried, key=lambda t: (t.retention or 0) if judge.kind == "retention" else -(t.rel_error or 0), default=None)
        reached = f"; the closest, {describe(closest)}, reached {keeps(closest)}" if closest else ""
        raise SettingError(
            judge.setting,
            f"adapter {name!r}: no representation within its own fp16 size keeps {judge.describe()} ({{setting}}){reached}",
            where=source.source,
        )
    key = ("grown", chosen.rank, chosen.vectors) if chosen.vectors else ("bank", chosen.rank) if chosen.codec == "bank" else chosen.key
    if key not in held:
        attempt_lowrank(chosen)
    tensors, table, modules, score, new, errors = held[key]
    plain = plain_within(grid, score.bytes) if grid is not None else best_plain(source.modules.values(), score.bytes)
    if plain is not None and judge.probe is not None:
        plain_tensors, plain_table = hold_lowrank(source, plain.rank, plain.bits)
        plain_modules = LOWRANK.decode(plain_tensors, plain_table, None, 0)
        plain.retention = judge.probe.measure({n: m.delta_weight() for n, m in plain_modules.items()}).headline
    return Holding(
        codec=chosen.codec,
        tensors=tensors,
        table=table,
        modules=modules,
        chosen=score,
        tried=sorted(tried, key=lambda t: t.bytes),
        errors={n: asdict(e) for n, e in errors.items()},
        calibrated=chosen.codec == "bank" and calibrate is not None,
        vectors=new,
        verdict=verdict_of(
            f"its {describe(score)}", source.modules.values(), score.bytes, score.rel_error, score.retention, plain, source.source
        ),
    )


def growth_rank(source: Adapter, judge: Judge, best_low: Tried | None, top: int) -> int:
    """The rank a grown bank codes at: the fewest directions whose exact truncation error is below the floor's ΔW
    error (four fifths of it: codes add their own), or with a retention floor below the ΔW error of the plain
    factors that met it (the bank's codes have to reach about as close)."""
    target = 0.8 * judge.value if judge.kind == "error" else best_low.rel_error if best_low is not None else 0.0
    sq = torch.zeros(top, dtype=torch.float64)
    for m in source.modules.values():
        s = m.balanced()[2].double()[:top]
        sq[: len(s)] += s.square()
    if sq.sum() <= 0:
        return 1
    left = (1 - sq.cumsum(0) / sq.sum()).clamp_min(0).sqrt()  # left[r-1]: error of the top r directions
    return next((r for r in range(1, top + 1) if left[r - 1] <= target), top)


def describe(t: Tried) -> str:
    return held_name(t.codec, t.rank, t.bits, per_module=t.ranks is not None, vectors=t.vectors)


def keeps(t: Tried) -> str:
    parts = [f"ΔW error {t.rel_error:.3f}" if t.rel_error is not None else "ΔW error -"]
    if t.retention is not None:
        parts.append(f"retention {t.retention:.3f}")
    return ", ".join(parts)
