"""Weight-space fit of one vector bank to every module of a LoRA.

Each module enters in the balanced gauge (``B' = U√S``, ``A' = √S Vh``, scale folded), where columns of
``B'`` and rows of ``A'`` are orthogonal with squared norm ``σ_i``. An error ``δ`` in row ``i`` of ``A'``
then costs exactly ``σ_i‖δ‖²`` of ``‖ΔW' − ΔW‖²_F`` (likewise for column ``i`` of ``B'``), so the first-order
objective is a σ-weighted sub-vector fit. The fit runs in three stages:

1. **seed** — max-residual seeding: after one assignment against a scale-matched uniform draw, every
   unused vector is placed on the worst-fitted σ-weighted sub-vectors, so the bank starts where the
   objective's error is (the role LoRA-GA's gradient start plays for training); σ-weighted k-means++
   with Lloyd steps is available (``init="kmeans++"``) and measured worse;
2. **alternate** — exact top-k assignment (for k=2, the best point on every segment between a near
   vector and any bank vector; greedy segment steps for k>2) and a closed-form weighted least-squares
   bank, repeated until 3 iterations gain less than ``FitSettings.tol``; dead vectors are re-seeded on
   the worst-fitted sub-vectors;
3. **refine** — Adam on the bank and the mixture logits against the exact ΔW error of every module,
   computed from r×r Gram matrices (no dense ΔW), which also captures the A×B cross terms the
   first-order objective ignores.

Where the time went at 7B scale (156k sub-vectors, N=2048, 2 CPU cores) and what cut it, 1020 s → 81 s:
the refine step was memory-bound on [S, k, L] gathers, autograd's split/transpose copies and fresh
page-faulted buffers (1.2 s a step → 0.125 s: sparse CSR mixing, a hand-written error gradient, reused
buffers); the alternation ran 20 iterations where 8–10 reach the same error (early stop), and each
assignment paid for fresh 64 MB temporaries (in-place, smaller chunks: 1.6× faster, identical output).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..adapter import VBCode
from ..linalg import balanced
from ..settings import FitSettings

# Elements of the [chunk, candidates, partners] scratch tensors in one assignment chunk (4 MB each in
# float32): at 7B scale, smaller chunks measured faster than 64 MB ones (1.22 s vs 1.42 s per assignment).
CHUNK_ELEMENTS = 1 << 20
# Alternation stops once the best error improved by less than FitSettings.tol over this many iterations.
PATIENCE = 3


@dataclass
class Problem:
    """Sub-vectors of all modules in the balanced gauge, laid out as PEFT tiles them."""

    names: list[str]
    B: list[torch.Tensor]  # balanced [out, r]
    A: list[torch.Tensor]  # balanced [r, in]
    U: torch.Tensor  # [S, L] sub-vectors: per module, A's then B's
    weight: torch.Tensor  # [S] σ of the sub-vector's rank direction
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (start, n_A, n_B) per module
    total_sq: float = 0.0  # Σ_m c_m ‖ΔW_m‖²: the objective's reference
    scales: list[float] = field(default_factory=list)  # c_m, each module's weight in the objective
    _groups: list | None = field(default=None, repr=False)
    _order: torch.Tensor | None = field(default=None, repr=False)
    _sizes: list[int] = field(default_factory=list, repr=False)
    _bt: dict = field(default_factory=dict, repr=False)
    _grad: torch.Tensor | None = field(default=None, repr=False)

    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Modules of one shape together: (G, B' [G, out, r], A' [G, r, in], c [G], ‖B'A'‖² [G]), in the
        order of :meth:`order`.

        The refine loop evaluates the exact error hundreds of times; a few batched matmuls per shape
        instead of a dozen small autograd ops per module is what makes it fast (a 7B adapter has 224
        modules but 7 shapes).
        """
        if self._groups is None:
            by_shape: dict[tuple[int, int, int], list[int]] = {}
            for i, (b, a) in enumerate(zip(self.B, self.A)):
                by_shape.setdefault((b.shape[0], a.shape[1], a.shape[0]), []).append(i)
            self._groups, order, sizes = [], [], []
            for members in by_shape.values():
                B = torch.stack([self.B[i] for i in members])
                A = torch.stack([self.A[i] for i in members])
                c = torch.tensor([self.scales[i] for i in members], dtype=B.dtype, device=B.device)
                self._groups.append((len(members), B, A, c, ((B.mT @ B) * (A @ A.mT)).sum((1, 2))))
                # A's sub-vectors already tile A' [r, in] row-major; B's are stored chunk by chunk (PEFT's
                # order), so read them column by column to tile B'ᵀ [r, out] row-major instead.
                for i in members:
                    start, na, _ = self.spans[i]
                    order.append(torch.arange(start, start + na))
                for i in members:
                    start, na, nb = self.spans[i]
                    r = self.A[i].shape[0]
                    order.append(torch.arange(start + na, start + na + nb).view(-1, r).T.reshape(-1))
                sizes += [sum(self.spans[i][1] for i in members), sum(self.spans[i][2] for i in members)]
            self._order, self._sizes = torch.cat(order).to(self.U.device), sizes
        return self._groups

    def Bt(self, g: int) -> torch.Tensor:
        """B'ᵀ [G, r, out] of group ``g``, contiguous (the error's gradient reads it row-wise)."""
        if g not in self._bt:
            self._bt[g] = self.groups()[g][1].mT.contiguous()
        return self._bt[g]

    def order(self) -> torch.Tensor:
        """``[S]`` permutation of the sub-vector table that makes every shape group one contiguous block
        (its A's, then its B's read as B'ᵀ), so :func:`exact_error` works on views, not copies."""
        self.groups()
        return self._order


def build_problem(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], length: int, ranks: dict[str, int], device, scales: dict[str, float] | None = None
) -> Problem:
    """Balance every module's ``(B, A)`` (scale folded), keep ``ranks[name]`` directions (zero-padded), and
    tile. ``scales[name]`` (default 1) weighs the module's error in the objective."""
    names, Bs, As, subs, weights, spans, cs = [], [], [], [], [], [], []
    start, total = 0, 0.0
    for name, (B, A) in factors.items():
        rank, c = ranks[name], (scales or {}).get(name, 1.0)
        b, a, s = balanced(B, A, rank)
        pad = rank - a.shape[0]
        if pad > 0:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            s = torch.cat([s, s.new_zeros(pad)])
        a, b, s = a.to(device), b.to(device), s.float().to(device)
        sub_a = a.reshape(-1, length)
        sub_b = b.reshape(-1, length, rank).transpose(1, 2).reshape(-1, length)
        names.append(name)
        Bs.append(b)
        As.append(a)
        subs += [sub_a, sub_b]
        weights += [c * s.repeat_interleave(a.shape[1] // length), c * s.repeat(b.shape[0] // length)]
        spans.append((start, sub_a.shape[0], sub_b.shape[0]))
        start += sub_a.shape[0] + sub_b.shape[0]
        total += c * float(s.double().square().sum())
        cs.append(c)
    return Problem(names, Bs, As, torch.cat(subs), torch.cat(weights), spans, total, cs)


def seed_bank(U: torch.Tensor, w: torch.Tensor, n: int, gen: torch.Generator, lloyd: int = 5) -> torch.Tensor:
    """Weighted k-means++ seeding (D² sampling with weights ``w``) and a few weighted Lloyd steps."""
    S = U.shape[0]
    if S <= n:
        extra = U[torch.randint(S, (n - S,), generator=gen, device="cpu").to(U.device)]
        noise = torch.randn(extra.shape, generator=gen).to(U.device) * U.std() * 0.1
        return torch.cat([U, extra + noise]).clone()
    mass = w.clamp_min(0) + 1e-12
    first = int(torch.multinomial(mass.cpu(), 1, generator=gen))
    centers = [U[first]]
    d2 = (U - U[first]).square().sum(1)
    # Seed in blocks so huge problems stay fast: each draw samples several centres from the same D².
    while len(centers) < n:
        take = min(n - len(centers), max(1, n // 64))
        p = (mass * d2).clamp_min(0).cpu().double()
        if p.sum() <= 0:
            p = torch.ones_like(p)
        idx = torch.multinomial(p, take, replacement=False, generator=gen).to(U.device)
        for i in idx.tolist():
            centers.append(U[i])
        new = U[idx]
        d2 = torch.minimum(d2, torch.cdist(U, new).square().min(1).values)
    bank = torch.stack(centers)
    for _ in range(lloyd):
        assign = nearest(U, bank)
        num = torch.zeros_like(bank).index_add_(0, assign, U * w[:, None])
        den = torch.zeros(n, device=U.device).index_add_(0, assign, w)
        used = den > 0
        bank[used] = num[used] / den[used, None]
    return bank


def nearest(U: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    out = torch.empty(U.shape[0], dtype=torch.long, device=U.device)
    nb = bank.square().sum(1)
    step = max(1, CHUNK_ELEMENTS // bank.shape[0])
    for s in range(0, U.shape[0], step):
        u = U[s : s + step]
        out[s : s + step] = (nb[None] - 2 * u @ bank.T).argmin(1)
    return out


def assign(
    U: torch.Tensor, bank: torch.Tensor, k: int, candidates: int, partners: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best convex combination of ``k`` distinct bank vectors for every sub-vector: (indices, weights) ``[S, k]``.

    k=1: nearest vector. k=2: for the ``candidates`` nearest vectors i, the best point of every segment
    [b_i, b_j] over the ``partners`` nearest j (all N when None), exactly. k>2: extend greedily, each step the best segment from the current
    point to a new vector.
    """
    S, n = U.shape[0], bank.shape[0]
    G = bank @ bank.T
    nb = G.diagonal()
    idx = torch.empty(S, k, dtype=torch.long, device=U.device)
    wts = torch.empty(S, k, device=U.device)
    m = min(candidates, n)
    mj = n if partners is None else max(m, min(partners, n))
    step = max(1, CHUNK_ELEMENTS // (m * mj))
    for s in range(0, S, step):
        u = U[s : s + step]
        P = u @ bank.T  # [c, N]
        nu = u.square().sum(1)
        d = P.mul(-2).add_(nb)  # ‖u − b‖² − ‖u‖²
        if k == 1:
            idx[s : s + step, 0] = d.argmin(1)
            wts[s : s + step, 0] = 1
            continue
        near = d.topk(mj, dim=1, largest=False).indices  # [c, J] partners; the first m are the candidates
        cand = near[:, :m]
        Pi, Pj = P.gather(1, cand), P.gather(1, near)  # u·b_i, u·b_j
        Gij = G[cand[:, :, None], near[:, None, :]]  # [c, m, J] b_i·b_j
        nbi, nbj = nb[cand], nb[near]
        # The [c, m, J] terms are computed in place, in the same operation order as the plain expressions
        # (identical results): fresh 64 MB temporaries cost more in page faults than the arithmetic.
        ee = (nu[:, None] - 2 * Pi + nbi)[..., None]  # ‖u − b_i‖²
        ef = (Pj[:, None, :] - Pi[..., None]).sub_(Gij).add_(nbi[..., None])  # (u − b_i)·(b_j − b_i)
        ff = Gij.mul_(-2).add_(nbj[:, None, :]).add_(nbi[..., None])  # ‖b_j − b_i‖²
        t = ff.clamp_min(1e-20)
        t = torch.div(ef, t, out=t).clamp_(0, 1)
        err = ef.mul_(2).sub_(ff.mul_(t)).mul_(t).neg_().add_(ee)  # ‖u − b_i‖² − t(2ef − t·ff)
        err[:, torch.arange(m), torch.arange(m)] = float("inf")  # j must differ from i
        flat = err.reshape(err.shape[0], -1).argmin(1)
        ci, cj = flat // mj, flat % mj
        rows = torch.arange(len(flat), device=U.device)
        i, j = cand[rows, ci], near[rows, cj]
        tt = t[rows, ci, cj]
        cur_idx = [i, j]
        cur_w = [1 - tt, tt]
        for _ in range(2, k):
            # current point c = Σ w b; add j on the segment [c, b_j]
            W = torch.stack(cur_w, 1)
            I = torch.stack(cur_idx, 1)
            cP = (W * P.gather(1, I)).sum(1)  # u·c
            cG = (W[..., None] * G[I]).sum(1)  # c·b_j  [c, N]
            cc = (W[:, :, None] * W[:, None, :] * G[I[:, :, None], I[:, None, :]]).sum((1, 2))
            ee = nu - 2 * cP + cc
            ef = P - cP[:, None] - cG + cc[:, None]
            ff = nb[None] - 2 * cG + cc[:, None]
            t = (ef / ff.clamp_min(1e-20)).clamp(0, 1)
            err = ee[:, None] - 2 * t * ef + t.square() * ff
            err.scatter_(1, I, float("inf"))
            j = err.argmin(1)
            tt = t[rows, j]
            cur_w = [w_ * (1 - tt) for w_ in cur_w] + [tt]
            cur_idx.append(j)
        idx[s : s + step] = torch.stack(cur_idx, 1)
        wts[s : s + step] = torch.stack(cur_w, 1)
    return idx, wts


def solve_bank(U: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, old: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Closed-form bank minimising ``Σ_s w_s ‖u_s − Σ_k wts_sk · bank[idx_sk]‖²`` for fixed codes.

    With the mixing matrix ``C: [S, N]`` (row s holds the code of sub-vector s) the bank solves
    ``(Cᵀ W C + λI) bank = Cᵀ W U + λ·old``, a small ridge keeping unused vectors where they were.
    """
    n = old.shape[0]
    M, R = normal_equations(U, w, idx, wts, n)
    lam = ridge * (M.diagonal().mean() + 1e-30)
    M.diagonal().add_(lam)
    return torch.linalg.solve(M, R + lam * old.double()).float()


def normal_equations(U: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Cᵀ W C [N, N], Cᵀ W U [N, L])`` in float64 for the sparse mixing matrix ``C`` of the codes."""
    S, k = idx.shape
    if U.device.type == "cpu":
        # scipy's sparse products: 2.4× faster than index_add_ at N=2048, S=156k (no [S, L] float64
        # temporaries), sequential and so deterministic; same result to the last bit in our measurement.
        import numpy as np
        import scipy.sparse as sp

        rows = np.repeat(np.arange(S), k)
        C = sp.csr_matrix((wts.double().numpy().ravel(), (rows, idx.numpy().ravel())), shape=(S, n))
        Cw = C.multiply(w.double().numpy()[:, None]).tocsr()
        return torch.from_numpy((Cw.T @ C).toarray()), torch.from_numpy(Cw.T @ U.double().numpy())
    M = torch.zeros(n * n, dtype=torch.float64, device=U.device)
    R = torch.zeros(n, U.shape[1], dtype=torch.float64, device=U.device)
    cw = wts.double() * w.double()[:, None]
    for a in range(k):
        R.index_add_(0, idx[:, a], cw[:, a : a + 1] * U.double())
        for b in range(k):
            M.index_add_(0, idx[:, a] * n + idx[:, b], cw[:, a] * wts[:, b].double())
    return M.reshape(n, n), R


def reseed_dead(bank: torch.Tensor, U: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, gen) -> int:
    """Move bank vectors no sub-vector uses onto the worst-fitted sub-vectors; returns how many moved."""
    used = torch.zeros(bank.shape[0], dtype=torch.bool, device=bank.device)
    used[idx[wts > 1e-4]] = True
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return 0
    resid = w * (U - (wts[..., None] * bank[idx]).sum(1)).square().sum(1)
    worst = resid.topk(min(len(dead), len(resid))).indices
    bank[dead[: len(worst)]] = U[worst]
    return len(worst)


class Mix(torch.autograd.Function):
    """``sub[s] = Σ_k w[s, k] · bank[idx[s, k]]`` with a hand-written backward.

    Autograd's gather-backward accumulates in parallel (run-to-run differences on CPU) and torch's
    deterministic mode makes it very slow; ``index_add_`` on CPU is sequential and fast.
    """

    @staticmethod
    def forward(ctx, bank: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bank, w, idx)
        return (w[..., None] * bank[idx]).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        bank, w, idx = ctx.saved_tensors
        grad_bank = torch.zeros_like(bank).index_add_(0, idx.reshape(-1), (w[..., None] * grad[:, None, :]).reshape(-1, bank.shape[1]))
        grad_w = (grad[:, None, :] * bank[idx]).sum(-1) if ctx.needs_input_grad[1] else None
        return grad_bank, grad_w, None


def exact_error(problem: Problem, sub: torch.Tensor) -> torch.Tensor:
    """``Σ_m c_m ‖B̂_m Â_m − B'_m A'_m‖²_F`` for a table of sub-vectors in :meth:`Problem.order`
    (differentiable), from r×r Gram matrices, batched over modules of one shape."""
    return _ExactError.apply(sub, problem)


class _ExactError(torch.autograd.Function):
    """The exact error with a hand-written gradient, written straight into one [S, L] buffer.

    With ``Ga = ÂÂᵀ``, ``Gb = B̂ᵀB̂``, ``Pa = ÂA'ᵀ``, ``Pb = B̂ᵀB'`` (all r×r) the error is
    ``Σ Gb∘Ga − 2 Σ Pb∘Pa + ‖B'A'‖²``, so ``∂/∂Â = 2(Gb Â − Pb A')`` and ``∂/∂B̂ᵀ = 2(Ga B̂ᵀ − Pa B'ᵀ)``: four
    thin products for the gradient where autograd ran eight, plus the copies and zero fills of its split
    and transpose backwards. The refine step is memory-bound, so fewer passes over the table is the speed.
    """

    @staticmethod
    def forward(ctx, sub: torch.Tensor, problem: Problem) -> torch.Tensor:
        groups = problem.groups()
        pieces = sub.split(problem._sizes)
        total, saved = sub.new_zeros((), dtype=torch.float64), []
        for g, (G, B, A, c, const) in enumerate(groups):
            a = pieces[2 * g].view(G, A.shape[1], -1)  # Â [G, r, in]
            bt = pieces[2 * g + 1].view(G, A.shape[1], -1)  # B̂ᵀ [G, r, out]
            Ga, Gb, Pa, Pb = a @ a.mT, bt @ bt.mT, a @ A.mT, bt @ B
            err = (Gb * Ga).sum((1, 2)) - 2 * (Pb * Pa).sum((1, 2)) + const
            total += (c * err).double().sum()
            saved.append((Ga, Gb, Pa, Pb))
        ctx.problem, ctx.saved = problem, saved
        ctx.save_for_backward(sub)
        return total.to(sub.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (sub,) = ctx.saved_tensors
        problem = ctx.problem
        if problem._grad is None or problem._grad.shape != sub.shape:
            problem._grad = torch.empty_like(sub)  # reused across steps, like Mixing's output
        out = problem._grad
        pieces, gpieces = sub.split(problem._sizes), out.split(problem._sizes)
        for g, ((G, B, A, c, _), (Ga, Gb, Pa, Pb)) in enumerate(zip(problem.groups(), ctx.saved)):
            r = A.shape[1]
            a, bt = pieces[2 * g].view(G, r, -1), pieces[2 * g + 1].view(G, r, -1)
            ga, gbt = gpieces[2 * g].view(G, r, -1), gpieces[2 * g + 1].view(G, r, -1)
            f = (2 * grad * c)[:, None, None]
            torch.bmm(f * Gb, a, out=ga).baddbmm_(f * Pb, A, alpha=-1)
            torch.bmm(f * Ga, bt, out=gbt).baddbmm_(f * Pa, problem.Bt(g), alpha=-1)
        return out, None


class Mixing:
    """The fixed support of the codes as sparse matrices: ``sub = C @ bank`` with ``C: [S, N]`` holding
    row s's k weights at its k indices. On CPU, torch's sparse CSR kernels do the forward (``C @ bank``)
    and both gradients (``Cᵀ @ grad`` and the sampled ``grad @ bankᵀ``) about 4× faster than gathers
    and ``index_add_`` at 7B scale, without [S, k, L] temporaries; elsewhere :class:`Mix` runs.
    """

    def __init__(self, idx: torch.Tensor, n: int):
        S, k = idx.shape
        self.idx, self.n, self.sparse = idx, n, idx.device.type == "cpu"
        if self.sparse:
            self.crow = torch.arange(0, S * k + 1, k)
            self.out: torch.Tensor | None = None
            self._transposed: tuple | None = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, crow, col, pattern) for ``Cᵀ`` and the sampled product; built on the first backward."""
        if self._transposed is None:
            flat = self.idx.reshape(-1)
            S, k = self.idx.shape
            order = torch.argsort(flat, stable=True)  # stable: Cᵀ sums in row order, like index_add_
            crow = torch.cat([flat.new_zeros(1), torch.bincount(flat, minlength=self.n).cumsum(0)])
            col = torch.arange(S).repeat_interleave(k)[order]
            self._transposed = (order, crow, col, csr(self.crow, flat, torch.ones(S * k), (S, self.n)))
        return self._transposed

    def __call__(self, bank: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sub [S, L]`` from ``bank [N, L]`` and mixture weights ``w [S, k]`` (differentiable in both)."""
        if not self.sparse:
            return Mix.apply(bank, w, self.idx)
        return _SparseMix.apply(bank, w, self)


@contextlib.contextmanager
def deterministic():
    """torch's deterministic kernels for the duration: CUDA's index_add/scatter accumulate with atomics, so
    only this makes a fit or a calibration on a GPU repeatable per seed."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch calls its CSR support "beta" on every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _SparseMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, bank: torch.Tensor, w: torch.Tensor, m: Mixing) -> torch.Tensor:
        ctx.save_for_backward(bank, w)
        ctx.m = m
        C = csr(m.crow, m.idx.reshape(-1), w.reshape(-1), (w.shape[0], m.n))
        if m.out is None or m.out.shape[1] != bank.shape[1]:
            m.out = bank.new_empty(w.shape[0], bank.shape[1])
        # Into one reused buffer: a fresh [S, L] result is mmap-ed and page-faulted on every call, which
        # took 10× the product itself (98 ms vs 9 ms at 7B scale). The last step's graph is gone by then.
        return torch.addmm(m.out, C, bank, beta=0, out=m.out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        bank, w = ctx.saved_tensors
        m = ctx.m
        grad_bank = grad_w = None
        order, crow, col, pattern = m.transposed()
        if ctx.needs_input_grad[0]:
            grad_bank = torch.sparse.mm(csr(crow, col, w.reshape(-1)[order], (m.n, w.shape[0])), grad)
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.sampled_addmm(pattern, grad, bank.T, beta=0.0).values().view(w.shape)
        return grad_bank, grad_w, None


@dataclass
class FitResult:
    bank: torch.Tensor  # [N, L]
    codes: dict[str, VBCode]
    rel_error: float  # √(Σ c_m ‖ΔW'_m − ΔW_m‖² / Σ c_m ‖ΔW_m‖²) over all modules (at the kept rank)
    history: list[tuple[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per part: setup, assign, solve, refine, error


def fit_bank(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    settings: FitSettings,
    progress: Callable[[str, int, int, float], None] | None = None,
    *,
    ranks: dict[str, int] | None = None,
    scales: dict[str, float] | None = None,
    bank: torch.Tensor | None = None,
) -> FitResult:
    """Fit one bank to all modules. ``factors``: name → ``(B [out, r], A [r, in])`` with the scale folded.

    ``settings.vector_length`` must be set and ``settings.device`` be ``cpu`` or ``cuda`` (the command
    resolves ``None`` and ``auto``). ``ranks`` gives each module's kept rank (default: ``settings.rank`` or
    the largest rank, zero-padded); ``scales`` weighs each module's squared error (a collection gives every
    adapter the same total weight). With ``bank: [N, L]`` the bank is frozen and only codes are fitted:
    one assignment, then refinement of the mixture weights (``add`` to a collection).
    """
    device = torch.device(settings.device)
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    frozen = bank is not None
    L, n, k = settings.vector_length, settings.num_vectors if bank is None else bank.shape[0], settings.topk
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(part: str) -> None:
        now = time.perf_counter()
        seconds[part] = seconds.get(part, 0.0) + now - clock[0]
        clock[0] = now

    if ranks is None:
        rank = settings.rank or max(A.shape[0] for _, A in factors.values())
        ranks = dict.fromkeys(factors, rank)
    prob = build_problem(factors, L, ranks, device, scales)
    lap("setup")
    U, w = prob.U, prob.weight
    history: list[tuple[str, float]] = []

    def rel(err_sq: float) -> float:
        return math.sqrt(max(err_sq, 0.0) / prob.total_sq) if prob.total_sq > 0 else 0.0

    def note(stage: str, i: int, total: int, err_sq: float) -> None:
        history.append((stage, rel(err_sq)))
        if progress:
            progress(stage, i, total, rel(err_sq))

    def exact(bank, idx, wts) -> float:
        lap("other")
        order = prob.order()
        with torch.no_grad():
            err = float(exact_error(prob, Mixing(idx[order], n)(bank, wts[order])))
        lap("error")
        return err

    if frozen:
        bank = bank.float().to(device)
        idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
        lap("assign")
        note("assign", 0, 0, exact(bank, idx, wts))
    else:
        if settings.init == "kmeans++":
            bank = seed_bank(U, w, n, gen)
        else:
            # Max-residual seeding: a uniform bank at the sub-vectors' scale is almost entirely unused after
            # the first assignment, so `reseed_dead` places the bank on the worst-fitted (σ-weighted)
            # sub-vectors. Measured better than k-means++ on every adapter tried (README).
            bound = float(U.abs().max())
            bank = (torch.rand(n, L, generator=gen) * 2 - 1).to(device) * bound
        lap("setup")
        idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
        lap("assign")
        best = (exact(bank, idx, wts), bank.clone(), idx, wts)
        bests = [best[0]]
        note("seed", 0, settings.iters, best[0])
        for it in range(settings.iters):
            bank = solve_bank(U, w, idx, wts, bank)
            reseed_dead(bank, U, w, idx, wts, gen)
            lap("solve")
            idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
            lap("assign")
            err = exact(bank, idx, wts)
            note("alternate", it + 1, settings.iters, err)
            if err < best[0]:
                best = (err, bank.clone(), idx, wts)
            bests.append(best[0])
            if len(bests) > PATIENCE and rel(bests[-1]) > (1 - settings.tol) * rel(bests[-1 - PATIENCE]):
                break  # converged: the refine stage gains more per second from here
        _, bank, idx, wts = best

    lap("other")
    bank, wts = refine(prob, bank, idx, wts, settings, note, train_bank=not frozen)
    lap("refine")
    err = exact(bank, idx, wts)
    codes = {}
    for i, name in enumerate(prob.names):
        start, na, nb = prob.spans[i]
        rank = prob.A[i].shape[0]
        sl_a, sl_b = slice(start, start + na), slice(start + na, start + na + nb)
        codes[name] = VBCode(
            indices_A=idx[sl_a].reshape(rank, -1, k).cpu(),
            weights_A=wts[sl_a].reshape(rank, -1, k).cpu(),
            indices_B=idx[sl_b].reshape(nb // rank, rank, k).cpu(),
            weights_B=wts[sl_b].reshape(nb // rank, rank, k).cpu(),
        )
    lap("other")
    return FitResult(bank=bank.cpu(), codes=codes, rel_error=rel(err), history=history, seconds=seconds)


def refine(prob: Problem, bank, idx, wts, settings: FitSettings, note, train_bank: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on bank (unless frozen) and mixture logits (support fixed) against the exact summed ΔW error."""
    steps = settings.refine_steps if train_bank else settings.code_refine_steps
    if steps <= 0 or not (train_bank or settings.topk > 1):
        return bank, wts
    # The support is fixed: permute it once into the group layout that exact_error reads as views.
    order = prob.order()
    mixing = Mixing(idx[order], bank.shape[0])
    bank_p = bank.clone().requires_grad_(train_bank)
    logits = wts[order].clamp_min(1e-6).log().requires_grad_(settings.topk > 1)
    # Adam steps are absolute: scale the bank's by its magnitude; logits live on an O(1) scale.
    groups = [{"params": [bank_p], "lr": settings.refine_lr * (bank.abs().mean().item() + 1e-12)}] if train_bank else []
    if settings.topk > 1:
        groups.append({"params": [logits], "lr": settings.refine_lr * 10})
    opt = torch.optim.Adam(groups)
    best_err, best = None, (bank, wts)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps + 1):
        loss = exact_error(prob, mixing(bank_p, torch.softmax(logits, -1)))
        err = loss.item()
        if best_err is None or err < best_err:
            best_err, best = err, (bank_p.detach().clone(), torch.softmax(logits, -1).detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        (loss / prob.total_sq).backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            note("refine", step, steps, err)
    note("refine", steps, steps, best_err)
    bank_best, w_best = best
    if w_best is not wts:
        w_best = torch.empty_like(w_best).index_copy_(0, order, w_best)  # back to the table's order
    return bank_best, w_best
