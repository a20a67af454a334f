"""Adam with a cosine learning-rate schedule, for the weight-space refine, without ``torch.optim``.

Constructing ``torch.optim.Adam`` imports torch's compiler (``torch._dynamo``): 1.3 s warm and 5.7 s with a
cold file cache on this project's machines, more than the 50 code-refine steps of a 7B ``add`` themselves.
The update is torch's own (single-tensor Adam, defaults β = (0.9, 0.999), ε = 1e-8, no weight decay) and the
schedule the closed form of ``CosineAnnealingLR`` (η_min = 0).
"""

from __future__ import annotations

import math

import torch


class CosineAdam:
    """Adam over ``groups`` (``[(params, lr), ...]``) whose learning rates follow a cosine from ``lr`` to 0
    over ``steps`` steps."""

    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], steps: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups = [(list(params), lr) for params, lr in groups]
        self.steps, self.betas, self.eps, self.t = max(1, steps), betas, eps, 0
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for params, _ in self.groups for p in params}

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        scale = (1 + math.cos(math.pi * self.t / self.steps)) / 2  # this step's share of each base rate
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for params, lr in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                m, v = self.state[id(p)]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(c2)).add_(self.eps)
                p.addcdiv_(m, denom, value=-lr * scale / c1)
