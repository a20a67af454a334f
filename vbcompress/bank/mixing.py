"""Sub-vectors from a bank and fixed top-k supports, differentiable in bank and weights: the products the
refine step and calibration run hundreds of times, written for speed and for repeatable results."""

from __future__ import annotations

import contextlib
import warnings

import torch


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
