"""A calibrated pack: one bank trained in function space on every adapter of a collection at once.

Each adapter keeps its own teacher (the base with its original ΔW), its own held-out split and its own codes;
the bank is one parameter that every adapter's codes decode through. Steps go round the adapters, one batch
of one adapter each, so memory is one adapter's forward and backward whatever their number, plus each
adapter's precomputed top-K teacher targets and full logits. Held-out texts are never trained on: each
adapter's split is the one its :class:`~vbcompress.bank.calibrate.Calibration` keeps (the floor measures on it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..codec.layout import VBCode, VectorBank
from ..settings import Progress
from .calibrate import BankModel, Calibration, train


@dataclass
class SharedReport:
    """What training the shared bank did: steps in all, per adapter, and the mean loss at the start and end
    (each adapter's loss is its KL divided by its own effect, so the mean weighs adapters alike)."""

    steps: int
    adapters: int
    first_loss: float | None
    last_loss: float | None
    seconds: float


def calibrate_shared(
    calibrations: list[Calibration], bank: torch.Tensor, codes: list[dict[str, VBCode]], topk: int, progress: Progress | None = None
) -> tuple[torch.Tensor, list[dict[str, VBCode]], SharedReport]:
    """Train ``bank [N, L]`` and every adapter's ``codes`` so that base + each adapter's decoded ΔW reproduces
    base + that adapter (``calibrations[i]``, prepared on one base model). Returns the bank, the codes and a report.
    Steps and rates are the first calibration's ``settings`` (``steps``, ``lr``: bank and codes train together)."""
    start = time.perf_counter()
    settings, base = calibrations[0].settings, calibrations[0].base
    torch.manual_seed(calibrations[0].seed)
    shared = nn.Parameter(bank.float().clone().to(base.device))
    models = []
    for cal, c in zip(calibrations, codes):
        model = BankModel(VectorBank(bank, topk, c), cal.source).to(base.device)
        model.bank = shared  # one tensor: every adapter's gradient lands on the same bank
        models.append(model)
    scale = float(bank.float().abs().mean()) + 1e-12
    groups = [{"params": [shared], "lr": settings.lr * scale}]
    groups += [{"params": list(m.logits), "lr": settings.lr * 10} for m in models]
    steps, n = settings.steps, len(calibrations)
    targets = [cal.targets() for cal in calibrations]

    def loss_at(step: int) -> torch.Tensor:
        i = step % n  # round the adapters, each through its own batches in turn
        cal, b = calibrations[i], (step // n) % len(calibrations[i].batches)
        return cal.objective.loss(cal.batches[b], targets[i][b], models[i].factors())

    with calibrations[0].mode():
        losses = train(groups, steps, loss_at, progress, "calibrate bank")
    trained = [m.vector_bank().codes for m in models]
    report = SharedReport(
        steps=steps,
        adapters=n,
        first_loss=sum(losses[:n]) / min(n, len(losses)) if losses else None,
        last_loss=sum(losses[-n:]) / min(n, len(losses)) if losses else None,
        seconds=time.perf_counter() - start,
    )
    cpu = [{name: VBCode(**{k: t.cpu() for k, t in vars(c).items()}) for name, c in codes_i.items()} for codes_i in trained]
    return shared.detach().cpu().clone(), cpu, report
