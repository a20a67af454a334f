"""The weight-space fit's fast paths compute what the plain definitions say: the error the refine step
descends is the true ΔW error, its gradient is the true gradient, and the sparse mixing is the gather."""

from __future__ import annotations

import pytest
import torch

from vbcompress.bank import fit as F
from vbcompress.settings import FitSettings


def factors(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Modules of three shapes (two share one), different ranks' worth of spectrum, like a real adapter."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (64, 128), "k": (64, 128), "up": (192, 64), "down": (64, 192)}
    return {
        n: (torch.randn(o, 4, generator=gen), torch.randn(4, i, generator=gen) * torch.tensor([1.0, 0.5, 0.2, 0.1])[:, None])
        for n, (o, i) in shapes.items()
    }


def dense_error(prob: F.Problem, table: torch.Tensor) -> torch.Tensor:
    """Σ c‖B̂Â − B'A'‖² from dense ΔW, with sub-vectors in PEFT's table order (no group layout)."""
    total = table.new_zeros((), dtype=torch.float64)
    L = table.shape[1]
    for i, (start, na, nb) in enumerate(prob.spans):
        r = prob.A[i].shape[0]
        a = table[start : start + na].reshape(r, -1)
        b = table[start + na : start + na + nb].reshape(-1, r, L).transpose(1, 2).reshape(-1, r)
        total = total + prob.scales[i] * (b.double() @ a.double() - prob.B[i].double() @ prob.A[i].double()).square().sum()
    return total


def test_exact_error_and_its_gradient_are_the_dense_ones():
    prob = F.build_problem(factors(), 32, dict.fromkeys(factors(), 4), "cpu", scales={"q": 1.0, "k": 2.0, "up": 0.5, "down": 1.0})
    table = (prob.U + 0.05 * torch.randn(prob.U.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    order = prob.order()
    fast = F.exact_error(prob, table[order])
    slow = dense_error(prob, table)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-4)  # float32 Gram sums against float64 dense
    (g_fast,) = torch.autograd.grad(fast, table)
    (g_slow,) = torch.autograd.grad(slow, table)
    assert torch.allclose(g_fast.double(), g_slow.double(), rtol=1e-3, atol=1e-4 * float(g_slow.abs().max()))
    # the fitted table itself has zero error
    assert float(F.exact_error(prob, prob.U[order])) == pytest.approx(0.0, abs=1e-3 * prob.total_sq)


def test_sparse_mixing_equals_gather_mixing_with_gradients():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 16, generator=gen, requires_grad=True)
    idx = torch.randint(50, (300, 3), generator=gen)
    w = torch.softmax(torch.randn(300, 3, generator=gen), -1).requires_grad_(True)
    mixing = F.Mixing(idx, 50)
    assert mixing.sparse
    upstream = torch.randn(300, 16, generator=gen)
    fast = mixing(bank, w)
    plain = (w[..., None] * bank[idx]).sum(1)
    assert torch.allclose(fast, plain, atol=1e-6)
    g_fast = torch.autograd.grad((fast * upstream).sum(), (bank, w))
    g_plain = torch.autograd.grad((plain * upstream).sum(), (bank, w))
    for a, b in zip(g_fast, g_plain):
        assert torch.allclose(a, b, atol=1e-5)


def test_alternation_stops_when_it_stops_gaining_and_the_fit_is_repeatable():
    settings = FitSettings(num_vectors=24, vector_length=32, iters=30, refine_steps=20, device="cpu")
    early = F.fit_bank(factors(), settings)
    full = F.fit_bank(factors(), FitSettings(**{**settings.__dict__, "tol": 0.0}))
    alternations = lambda r: sum(stage == "alternate" for stage, _ in r.history)  # noqa: E731
    assert alternations(full) == 30 and alternations(early) < 30
    # stopping early costs little: the refine stage makes up for the skipped alternations
    assert early.rel_error < full.rel_error + 0.02
    again = F.fit_bank(factors(), settings)
    assert torch.equal(again.bank, early.bank) and again.rel_error == early.rel_error


def test_refine_stops_when_it_stops_gaining():
    """`tol` ends the refine too: it stops before a large `refine_steps` once 50 steps gain less than tol,
    within 0.005 of the full run's error; `tol=0` runs every step."""
    settings = FitSettings(num_vectors=24, vector_length=32, iters=3, refine_steps=600, device="cpu")

    def refine_steps_run(s):
        calls = []
        result = F.fit_bank(factors(), s, lambda stage, i, total, err: calls.append((stage, i)))
        return result, max(i for stage, i in calls if stage == "refine")

    early, early_steps = refine_steps_run(settings)
    full, full_steps = refine_steps_run(FitSettings(**{**settings.__dict__, "tol": 0.0}))
    assert full_steps == 600 and early_steps < 600
    assert early.rel_error < full.rel_error + 0.005


def test_tol_is_checked():
    with pytest.raises(Exception, match="tol"):
        FitSettings(tol=1.5).check()
