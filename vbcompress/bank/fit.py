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
   bank, repeated until 3 iterations gain less than ``FitSettings.tol`` or one gains less than twice it;
   dead vectors are re-seeded on the worst-fitted sub-vectors;
3. **refine** — Adam on the bank and the mixture logits against the exact ΔW error of every module,
   computed from r×r Gram matrices (no dense ΔW), which also captures the A×B cross terms the
   first-order objective ignores.

Where the time went at 7B scale (156k sub-vectors, N=2048, 2 CPU cores) and what cut it, 1020 s → 81 s:
the refine step was memory-bound on [S, k, L] gathers, autograd's split/transpose copies and fresh
page-faulted buffers (1.2 s a step → 0.125 s: sparse CSR mixing, a hand-written error gradient, reused
buffers); the alternation ran 20 iterations where 8–10 reach the same error (early stop), and each
assignment paid for fresh 64 MB temporaries (in-place, smaller chunks: 1.6× faster, identical output).
Then 38 s → 21 s of fit (41 → 25 s for the command, on a faster machine): the bank's refine rate was 13× too low
(3e-3 → 4e-2: better on every corpus row), after which the refine gains more per second than late alternation
iterations, so one slow iteration now ends the alternation (7 → 3 iterations; ΔW error 0.9752 → 0.9720).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from ..codec.layout import VBCode, code_of, tile_A, tile_B
from ..linalg import balanced
from ..settings import FitSettings, Progress
from .adam import CosineAdam
from .assign import assign, reseed_dead, residuals, seed_bank, solve_bank
from .mixing import Mixing

# Alternation stops once the best error improved by less than FitSettings.tol over this many iterations,
PATIENCE = 3
# or (FitSettings.stop_gain) once one iteration improved it by less than stop_gain × tol.
# What refining codes against a frozen bank can gain, as a share of the assignment's error, generously: measured
# 0.27% (gemma3-270m on its siblings' bank: 0.8976 → 0.8952 after 50 steps, 0.8951 after 300).
REFINE_REACH = 0.05
# Refinement stops once its best error improved by less than FitSettings.tol over this many steps. At 7B scale the
# last 175 of 300 steps gained 0.0007 (0.9752 -> 0.9745) at 0.17 s a step.
REFINE_WINDOW = 50


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
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    length: int,
    ranks: dict[str, int],
    device,
    scales: dict[str, float] | None = None,
) -> Problem:
    """Balance every module's ``(B, A)`` (scale folded; or take ``(B', A', σ)`` already balanced, as
    :meth:`~vbcompress.adapter.LoraModule.balanced` caches them), keep ``ranks[name]`` directions (zero-padded),
    and tile. ``scales[name]`` (default 1) weighs the module's error in the objective."""
    names, Bs, As, subs, weights, spans, cs = [], [], [], [], [], [], []
    start, total = 0, 0.0
    for name, pair in factors.items():
        rank, c = ranks[name], (scales or {}).get(name, 1.0)
        if len(pair) == 3:
            b, a, s = pair[0][:, :rank], pair[1][:rank], pair[2][:rank]
        else:
            b, a, s = balanced(*pair, rank)
        pad = rank - a.shape[0]
        if pad > 0:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            s = torch.cat([s, s.new_zeros(pad)])
        a, b, s = a.to(device), b.to(device), s.float().to(device)
        sub_a, sub_b = tile_A(a, length), tile_B(b, length)
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
        for g, ((G, _, A, c, _), (Ga, Gb, Pa, Pb)) in enumerate(zip(problem.groups(), ctx.saved)):
            r = A.shape[1]
            a, bt = pieces[2 * g].view(G, r, -1), pieces[2 * g + 1].view(G, r, -1)
            ga, gbt = gpieces[2 * g].view(G, r, -1), gpieces[2 * g + 1].view(G, r, -1)
            f = (2 * grad * c)[:, None, None]
            torch.bmm(f * Gb, a, out=ga).baddbmm_(f * Pb, A, alpha=-1)
            torch.bmm(f * Ga, bt, out=gbt).baddbmm_(f * Pa, problem.Bt(g), alpha=-1)
        return out, None


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
    progress: Progress | None = None,
    *,
    ranks: dict[str, int] | None = None,
    scales: dict[str, float] | None = None,
    bank: torch.Tensor | None = None,
    grow: int = 0,
    refine_within: float | None = None,
) -> FitResult:
    """Fit one bank to all modules. ``factors``: name → ``(B [out, r], A [r, in])`` with the scale folded, or
    balanced ``(B', A', σ)``.

    ``settings.vector_length`` must be set and ``settings.device`` be ``cpu`` or ``cuda`` (the command
    resolves ``None`` and ``auto``). ``ranks`` gives each module's kept rank (default: ``settings.rank`` or
    the largest rank, zero-padded); ``scales`` weighs each module's squared error (a collection gives every
    adapter the same total weight). With ``bank: [N, L]`` the bank is frozen and only codes are fitted:
    one assignment, then refinement of the mixture weights (``add`` to a collection). With ``grow`` as well,
    that many vectors are appended to the frozen bank, fitted to what it leaves unexplained (seeded on the
    worst-fitted sub-vectors, then the same alternation and refinement with the given rows held fixed); the
    result's bank is ``[N + grow, L]``, its first N rows unchanged. ``refine_within``: with a frozen bank, refine
    the codes only if the assignment's relative error, less what refinement can gain (``REFINE_REACH``), is at
    most this (a floor the codes cannot reach either way needs no 50 steps of Adam).
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
            err = float(exact_error(prob, Mixing(idx[order], bank.shape[0])(bank, wts[order])))
        lap("error")
        return err

    def alternate(bank: torch.Tensor, fixed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Assignment and closed-form bank in turn (rows below ``fixed`` held), keeping the best."""
        idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
        lap("assign")
        best = (exact(bank, idx, wts), bank.clone(), idx, wts)
        bests = [best[0]]
        note("seed", 0, settings.iters, best[0])
        for it in range(settings.iters):
            bank = solve_bank(U, w, idx, wts, bank, fixed=fixed)
            reseed_dead(bank, U, w, idx, wts, gen, start=fixed)
            lap("solve")
            idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
            lap("assign")
            err = exact(bank, idx, wts)
            note("alternate", it + 1, settings.iters, err)
            if err < best[0]:
                best = (err, bank.clone(), idx, wts)
            bests.append(best[0])
            gain = rel(bests[-2]) - rel(bests[-1])
            # An iteration that improved nothing is no reason to stop: after re-seeding dead vectors one can be worse
            # than its predecessor and the next much better (whisper-small-qv at N=256: 0.866, 1.462, 0.606).
            if 0 < gain < settings.stop_gain * settings.tol * rel(bests[-2]):
                break  # slowing: the refine stage gains more per second from here
            if len(bests) > PATIENCE and rel(bests[-1]) > (1 - settings.tol) * rel(bests[-1 - PATIENCE]):
                break  # converged
        return best[1], best[2], best[3]

    fixed = 0
    if frozen and grow:
        bank = bank.float().to(device)
        fixed = bank.shape[0]
        idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
        lap("assign")
        # New vectors seeded where the frozen bank leaves error, spread out (k-means++ weighted by that error):
        # the worst-fitted sub-vectors alone are often near-copies of one direction.
        bank = torch.cat([bank, seed_bank(U, residuals(bank, U, w, idx, wts), grow, gen)])
        bank, idx, wts = alternate(bank, fixed)
    elif frozen:
        bank = bank.float().to(device)
        idx, wts = assign(U, bank, k, settings.candidates, settings.partners)
        lap("assign")
        err = exact(bank, idx, wts)
        note("assign", 0, 0, err)
        if refine_within is not None and rel(err) * (1 - REFINE_REACH) > refine_within:
            settings = replace(settings, code_refine_steps=0)
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
        bank, idx, wts = alternate(bank, 0)

    lap("other")
    bank, wts = refine(prob, bank, idx, wts, settings, note, train_bank=not frozen or fixed > 0, fixed=fixed)
    lap("refine")
    err = exact(bank, idx, wts)
    codes = {}
    for i, name in enumerate(prob.names):
        start, na, nb = prob.spans[i]
        rows = slice(start, start + na + nb)
        codes[name] = code_of(idx[rows].cpu(), wts[rows].cpu(), prob.A[i].shape[0], prob.A[i].shape[1], prob.B[i].shape[0], L)
    lap("other")
    return FitResult(bank=bank.cpu(), codes=codes, rel_error=rel(err), history=history, seconds=seconds)


def refine(
    prob: Problem, bank, idx, wts, settings: FitSettings, note, train_bank: bool = True, fixed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on bank (unless frozen; its first ``fixed`` rows held) and mixture logits (support fixed) against
    the exact summed ΔW error."""
    steps = settings.refine_steps if train_bank else settings.code_refine_steps
    if steps <= 0 or not (train_bank or settings.topk > 1):
        return bank, wts
    # The support is fixed: permute it once into the group layout that exact_error reads as views.
    order = prob.order()
    mixing = Mixing(idx[order], bank.shape[0])
    bank_p = bank.clone().requires_grad_(train_bank)
    if train_bank and fixed:
        # Adam moves a parameter only where its gradient has been non-zero: held rows stay exactly as given.
        bank_p.register_hook(lambda g: torch.cat([g.new_zeros(fixed, g.shape[1]), g[fixed:]]))
    logits = wts[order].clamp_min(1e-6).log().requires_grad_(settings.topk > 1)
    # Adam steps are absolute: scale the bank's by its magnitude; logits live on an O(1) scale.
    groups = [([bank_p], settings.refine_lr * (bank.abs().mean().item() + 1e-12))] if train_bank else []
    if settings.topk > 1:
        groups.append(([logits], settings.logits_lr))
    opt = CosineAdam(groups, steps)
    best_err, best, trail = None, (bank, wts), []
    for step in range(steps + 1):
        loss = exact_error(prob, mixing(bank_p, torch.softmax(logits, -1)))
        err = loss.item()
        if best_err is None or err < best_err:
            best_err, best = err, (bank_p.detach().clone(), torch.softmax(logits, -1).detach().clone())
        trail.append(best_err)
        # converged (the relative error, as the alternation measures it, gained less than tol in a window)
        if step == steps or (settings.tol and step >= REFINE_WINDOW and best_err >= (1 - settings.tol) ** 2 * trail[-REFINE_WINDOW - 1]):
            break
        opt.zero_grad()
        (loss / prob.total_sq).backward()
        opt.step()
        if step % 25 == 0:
            note("refine", step, steps, err)
    note("refine", step, steps, best_err)
    bank_best, w_best = best
    if w_best is not wts:
        w_best = torch.empty_like(w_best).index_copy_(0, order, w_best)  # back to the table's order
    return bank_best, w_best
