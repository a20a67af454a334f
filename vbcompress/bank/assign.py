"""Top-k assignment of sub-vectors to a bank, and the closed-form bank for fixed codes (the alternation of
:func:`~vbcompress.bank.fit.fit_bank`), with the seeding rules that start it."""

from __future__ import annotations

import torch

from .mixing import Mixing

# Elements of the [chunk, candidates, partners] scratch tensors in one assignment chunk (4 MB each in
# float32): at 7B scale, smaller chunks measured faster than 64 MB ones (1.22 s vs 1.42 s per assignment).
CHUNK_ELEMENTS = 1 << 20


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


def assign(U: torch.Tensor, bank: torch.Tensor, k: int, candidates: int, partners: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def solve_bank(
    U: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, old: torch.Tensor, ridge: float = 1e-6, fixed: int = 0
) -> torch.Tensor:
    """Closed-form bank minimising ``Σ_s w_s ‖u_s − Σ_k wts_sk · bank[idx_sk]‖²`` for fixed codes.

    With the mixing matrix ``C: [S, N]`` (row s holds the code of sub-vector s) the bank solves
    ``(Cᵀ W C + λI) bank = Cᵀ W U + λ·old``, a small ridge keeping unused vectors where they were. The first
    ``fixed`` rows are held as they are (a grown bank): only the rest are solved for, given them.
    """
    n = old.shape[0]
    M, R = normal_equations(U, w, idx, wts, n)
    lam = ridge * (M.diagonal().mean() + 1e-30)
    M.diagonal().add_(lam)
    if fixed:
        rhs = R[fixed:] - M[fixed:, :fixed] @ old[:fixed].double() + lam * old[fixed:].double()
        return torch.cat([old[:fixed], torch.linalg.solve(M[fixed:, fixed:], rhs).to(old.dtype)])
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


def residuals(bank: torch.Tensor, U: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """``[S]`` each sub-vector's weighted squared error under its code."""
    # the codes' sub-vectors by a sparse product (CPU): 6× faster than gathering [S, k, L] at 7B scale, the same numbers
    return w * Mixing(idx, bank.shape[0])(bank, wts).sub_(U).square_().sum(1)


def reseed_dead(bank: torch.Tensor, U: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, gen, start: int = 0) -> int:
    """Move bank vectors (from row ``start`` on) no sub-vector uses onto the worst-fitted sub-vectors; returns
    how many moved."""
    used = torch.zeros(bank.shape[0], dtype=torch.bool, device=bank.device)
    used[idx[wts > 1e-4]] = True
    used[:start] = True
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return 0
    resid = residuals(bank, U, w, idx, wts)
    worst = resid.topk(min(len(dead), len(resid))).indices
    bank[dead[: len(worst)]] = U[worst]
    return len(worst)
