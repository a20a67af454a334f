"""The low-rank ladder: every setting of the low-rank codec (one rank for every module, or ranks chosen per
module, at 16, 8, 4, 3 or 2 bits) priced with its exact stored bytes and ΔW error, and its Pareto front. The
floor search (:mod:`.hold`) walks the front; the verdict's plain baseline is read off the same grid."""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import torch

from ..adapter import Adapter
from ..baselines import GROUP, quantize
from ..codec.lowrank import BITS, packed_bytes
from ..linalg import gram_sq_norm
from ..verdict import PLAIN_BITS, Plain


@dataclass
class Tried:
    """One representation tried for an adapter: its bytes and what it kept."""

    codec: str
    rank: int
    bits: int | None
    bytes: int
    rel_error: float | None
    retention: float | None = None  # KL retention (causal LMs) or effect retention (encoders), held-out text
    met: bool = False
    ranks: list[int] | None = None  # low-rank factors: each module's rank, in module order (None: `rank` for all)
    vectors: int = 0  # bank codes: vectors this adapter adds to the bank (a grown bank; their bytes are in `bytes`)
    warm_from: int | None = None  # calibrated bank codes: the higher rank whose calibrated codes, sliced, this try started from

    @property
    def key(self) -> tuple:
        return (self.codec, self.rank, self.bits, tuple(self.ranks or ()), self.vectors)


THIN = 1.03  # consecutive front points differ by at least 3% in bytes


def lowrank_front(source: Adapter, per_module: bool = True) -> list[Tried]:
    """Settings of the low-rank codec on the Pareto front of bytes against ΔW error, cheapest first; errors exact,
    from the quantized factors. Two ways to spend bytes compete at every bit width: one rank for every module,
    and ranks chosen per module (SARA's idea: a module whose next direction removes more error per byte gets
    it first, greedily from rank 1 everywhere, on the exact quantized errors)."""
    return front_of(lowrank_grid(source, per_module))


def lowrank_grid(source: Adapter, per_module: bool = True) -> list[Tried]:
    """Every setting :func:`lowrank_front` weighs (one rank for all at each bit width, then the per-module steps),
    with its exact bytes and ΔW error."""
    modules = list(source.modules.values())
    top = max(m.r for m in modules)
    # Balanced factors (their product is the module's ΔW; slicing them is truncation, directions in σ order),
    # kept in float64: each error below is ‖ΔW‖² − 2⟨ΔW, ΔW̃⟩ + ‖ΔW̃‖² from r×r Gram matrices, exact to float64
    # rounding at the errors a front spans, and no QR per point (a 7B adapter has ~18,000 module points).
    factors = [tuple(t.double() for t in m.balanced()[:2]) for m in modules]
    norms = [float(gram_sq_norm(b, a)) for b, a in factors]
    ref = sum(norms)
    if ref <= 0:
        return [Tried("lowrank", 1, min(BITS), sum(packed_bytes(m.in_features + m.out_features, min(BITS)) for m in modules), None)]
    grid: list[Tried] = []
    for bits in BITS:
        # err[i][r-1], size[i][r-1]: module i at rank r.
        err, size = [], []
        for m, (b, a), norm in zip(modules, factors, norms):
            e = [max(norm - 2 * c + g, 0.0) for c, g in zip(*rank_terms(b, a, bits))]
            err.append(e)
            size.append([packed_bytes(r * (m.in_features + m.out_features), bits) for r in range(1, m.r + 1)])
        grid += [point(rank, bits, err, size, ref) for rank in range(1, top + 1)]
        if per_module:
            grid += greedy_points([m.r for m in modules], bits, err, size, ref)
    return grid


def front_of(grid: list[Tried]) -> list[Tried]:
    """The Pareto front of ``grid`` (bytes against ΔW error), thinned; see :func:`lowrank_front`."""
    if len(grid) == 1 and grid[0].rel_error is None:  # an empty adapter: its cheapest point, nothing to weigh
        return grid
    front, best = [], float("inf")
    for t in sorted(grid, key=lambda t: (t.bytes, t.rel_error, t.ranks is not None)):
        if t.rel_error < best:
            front.append(t)
            best = t.rel_error
    # Per-module steps make the front dense (hundreds of points); with a base each point the search visits costs
    # a pass over held-out text, so keep points at least THIN apart in bytes (and the last, the most faithful).
    # The best point within each one-rank setting's bytes is always kept, so thinning never loses to one rank.
    sizes = [f.bytes for f in front]
    anchors = {max(bisect.bisect_right(sizes, t.bytes) - 1, 0) for t in grid if t.ranks is None}
    kept = front[:1]
    for i, t in enumerate(front[1:], 1):
        if i in anchors or t.bytes >= THIN * kept[-1].bytes or i == len(front) - 1:
            kept.append(t)
    return kept


def rank_terms(b: torch.Tensor, a: torch.Tensor, bits: int) -> tuple[list[float], list[float]]:
    """For balanced float64 factors ``b [out, R]``, ``a [R, in]`` and the top r ≤ R directions stored at ``bits``
    (``b̃``, ``ã``): ``⟨ΔW, ΔW̃⟩`` and ``‖ΔW̃‖²`` for every r, from r×r Gram matrices.

    Stored factors group values direction by direction (rows of ``a`` and of ``bᵀ``), so where ``in`` and
    ``out`` are multiples of the group, rank r's stored factors are the first r directions of rank R's: quantize
    once, and every rank's terms are prefix sums of four R×R products (else each rank is quantized apart).
    Modules are priced one at a time: stacking a 7B adapter's modules of one shape measured 1.6× slower
    (memory-bound temporaries)."""

    def stored(t: torch.Tensor) -> torch.Tensor:  # t: [r, dim], a direction per row
        return t.half().double() if bits == 16 else quantize(t.float(), bits).double()

    R = a.shape[0]
    if bits == 16 or (a.shape[1] % GROUP == 0 and b.shape[0] % GROUP == 0):
        qa, qbt = stored(a), stored(b.T)
        cross = ((b.T @ qbt.T) * (a @ qa.T)).sum(0).cumsum(0)  # column j: direction j's share of ⟨ΔW, ΔW̃⟩
        g = (qbt @ qbt.T) * (qa @ qa.T)
        gram = (2 * g.tril().sum(1) - g.diagonal()).cumsum(0)  # leading r×r block sums
        return cross.tolist(), gram.tolist()
    cross, gram = [], []
    for r in range(1, R + 1):
        qa, qbt = stored(a[:r]), stored(b[:, :r].T)
        cross.append(float(((b.T @ qbt.T) * (a @ qa.T)).sum()))
        gram.append(float(gram_sq_norm(qbt.T, qa)))
    return cross, gram


def greedy_points(top: list[int], bits: int, err: list[list[float]], size: list[list[int]], ref: float) -> list[Tried]:
    """From rank 1 everywhere, one direction at a time to the module whose next one removes the most error per
    byte (``err[i][r-1]``, ``size[i][r-1]``: module i at rank r; ``top[i]`` its own rank): a point per step."""
    ranks, points = [1] * len(top), []

    def gain(i: int) -> tuple[float, int]:  # negated: heapq pops the smallest
        r = ranks[i]
        return (-(err[i][r - 1] - err[i][r]) / max(size[i][r] - size[i][r - 1], 1), i)

    heap = [gain(i) for i in range(len(top)) if top[i] > 1]
    heapq.heapify(heap)
    total_err, total_size = sum(e[0] for e in err), sum(n[0] for n in size)
    while heap:
        _, i = heapq.heappop(heap)
        r = ranks[i] = ranks[i] + 1
        total_err += err[i][r - 1] - err[i][r - 2]
        total_size += size[i][r - 1] - size[i][r - 2]
        same = len(set(ranks)) == 1  # one rank after all: said as such
        points.append(
            Tried("lowrank", max(ranks), bits, total_size, (max(total_err, 0.0) / ref) ** 0.5, ranks=None if same else list(ranks))
        )
        if r < top[i]:
            heapq.heappush(heap, gain(i))
    return points


def point(rank: int, bits: int, err: list[list[float]], size: list[list[int]], ref: float) -> Tried:
    """One rank for every module: each at min(``rank``, its own rank, the length of its row in ``err``)."""
    total = sum(e[min(rank, len(e)) - 1] for e in err)
    return Tried("lowrank", rank, bits, sum(n[min(rank, len(n)) - 1] for n in size), (total / ref) ** 0.5)


def plain_within(grid: list[Tried], budget: int) -> Plain | None:
    """The verdict's plain baseline read off the ladder already priced: the one-rank setting at fp16, int8 or int4
    with the least ΔW error in at most ``budget`` bytes (bytes as the low-rank codec stores them)."""
    fits = [t for t in grid if t.ranks is None and t.bits in PLAIN_BITS and t.bytes <= budget and t.rel_error is not None]
    if not fits:
        return None
    t = min(fits, key=lambda t: (t.rel_error, t.bytes))
    return Plain(bits=t.bits, rank=t.rank, bytes=t.bytes, rel_error=t.rel_error)
