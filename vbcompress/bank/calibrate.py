"""Function-space distillation: teach the bank what the adapter *does* on calibration inputs.

The teacher is the base model with the original LoRA's ΔW added; the student is the base with the ΔW the
bank decodes to. Bank and full logits are trained as VB-LoRA trains them (top-k admixture over the logits),
starting from the weight-space fit, so that the student's outputs match the teacher's: hidden states (MSE)
for encoders, next-token distributions (KL) for causal LMs. The loss is divided by the size of the
adapter's own effect on the batch, which makes it a direct proxy for 1 − effect retention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import Adapter, VBCode, VectorBank
from ..basemodel import Base, Retention, effect_distance, retention
from ..settings import CalibrationSettings
from .fit import Mix


@dataclass
class CalibrationReport:
    """What calibration did and kept; ``retention_*`` are measured on held-out samples never trained on."""

    steps: int
    samples: int
    heldout_samples: int
    batch_size: int
    max_length: int
    lr: float
    seed: int
    objective: str  # "KL" (causal LMs) or "MSE" (hidden states)
    retention_before: Retention | None
    retention_after: Retention | None
    first_loss: float | None
    last_loss: float | None
    base: str | None = None  # filled in by the command: the base as given, the data used, the file
    data: str | None = None
    calibration_file: str | None = None
    frozen_bank: bool = False


class BankModel(nn.Module):
    """Bank + full logits in PEFT's layout for every module, decoding to ΔW with top-k admixture."""

    def __init__(self, vb: VectorBank, adapter: Adapter, init_gap: float = 4.0):
        super().__init__()
        self.topk = vb.topk
        self.bank = nn.Parameter(vb.bank.float().clone())
        self.names = list(vb.codes)
        self.layout = {n: adapter.modules[n].transposed for n in self.names}
        self.logits = nn.ParameterList()
        n = vb.num_vectors
        for name in self.names:
            code = vb.codes[name]
            for idx, w in ((code.indices_A, code.weights_A), (code.indices_B, code.weights_B)):
                logw = w.float().clamp_min(1e-6).log()
                # Unselected vectors start `init_gap` below the weakest selected one: they can enter the
                # top-k during training when the selected logits fall, as in VB-LoRA.
                full = (logw.min(-1, keepdim=True).values - init_gap).expand(*idx.shape[:-1], n).clone()
                self.logits.append(nn.Parameter(full.scatter(-1, idx.long(), logw)))

    def codes(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = self.logits[i].topk(self.topk, dim=-1)
        return idx, torch.softmax(top, -1)

    def deltas(self) -> dict[str, torch.Tensor]:
        out = {}
        length = self.bank.shape[1]
        for j, name in enumerate(self.names):
            (ia, wa), (ib, wb) = self.codes(2 * j), self.codes(2 * j + 1)
            a = Mix.apply(self.bank, wa.reshape(-1, self.topk), ia.reshape(-1, self.topk)).reshape(ia.shape[0], -1)
            b = Mix.apply(self.bank, wb.reshape(-1, self.topk), ib.reshape(-1, self.topk))
            b = b.reshape(ib.shape[0], ib.shape[1], length).transpose(1, 2).reshape(-1, ib.shape[1])
            delta = b @ a
            out[name] = delta.T if self.layout[name] else delta
        return out

    def vector_bank(self) -> VectorBank:
        codes = {}
        with torch.no_grad():
            for j, name in enumerate(self.names):
                (ia, wa), (ib, wb) = self.codes(2 * j), self.codes(2 * j + 1)
                codes[name] = VBCode(ia, wa, ib, wb)
            return VectorBank(bank=self.bank.detach().clone(), topk=self.topk, codes=codes)


def calibrate(
    source: Adapter,
    vb: VectorBank,
    base: Base,
    texts: list[str],
    settings: CalibrationSettings,
    seed: int = 0,
    progress: Callable[[str, int, int, float], None] | None = None,
    freeze_bank: bool = False,
) -> tuple[VectorBank, CalibrationReport]:
    """Train ``vb`` so that base + bank reproduces base + ``source`` on ``texts``; returns the bank and a report.

    A held-out share of ``texts`` is never trained on; retention before/after is measured on it. With
    ``freeze_bank`` only the logits train (a bank that other adapters share must not move).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(texts), generator=gen).tolist()
    texts = [texts[i] for i in order][: settings.samples]
    n_held = max(1, round(len(texts) * settings.heldout)) if len(texts) > 1 else 0
    held, train = texts[:n_held], texts[n_held:] or texts
    teacher = {n: m.delta_weight() for n, m in source.modules.items()}
    model = BankModel(vb, source)
    model.bank.requires_grad_(not freeze_bank)
    with torch.no_grad():
        before = retention(base, held, teacher, model.deltas(), settings.max_length) if held else None
    scale = float(vb.bank.float().abs().mean()) + 1e-12
    groups = [{"params": list(model.logits), "lr": settings.lr * 10}]
    if not freeze_bank:
        groups.append({"params": [model.bank], "lr": settings.lr * scale})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.steps))
    batches = [base.encode(train[i : i + settings.batch_size], settings.max_length) for i in range(0, len(train), settings.batch_size)]
    with torch.no_grad():
        targets = [(base.forward(b, teacher), base.forward(b, None)) for b in batches]
    losses = []
    for step in range(settings.steps):
        i = step % len(batches)
        student = base.forward(batches[i], model.deltas())
        gap, effect = effect_distance(base, student, *targets[i], batches[i]["attention_mask"])
        loss = gap / effect.clamp_min(1e-12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 5 == 0 or step == settings.steps - 1):
            progress("calibrate", step + 1, settings.steps, math.sqrt(max(losses[-1], 0.0)))
    result = model.vector_bank()
    with torch.no_grad():
        after = retention(base, held, teacher, BankModel(result, source).deltas(), settings.max_length) if held else None
    report = CalibrationReport(
        steps=settings.steps, samples=len(texts), heldout_samples=len(held), batch_size=settings.batch_size,
        max_length=settings.max_length, lr=settings.lr, seed=seed, objective="KL" if base.causal else "MSE",
        retention_before=before, retention_after=after, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None, frozen_bank=freeze_bank,
    )  # fmt: skip
    return result, report
