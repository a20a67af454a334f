"""Function-space distillation: teach the bank what the adapter *does* on calibration inputs.

The teacher is the base model with the original LoRA's ΔW added; the student is the base with the ΔW the
bank decodes to. Bank and full logits are trained as VB-LoRA trains them (top-k admixture over the logits),
starting from the weight-space fit, so that the student's outputs match the teacher's: hidden states (MSE)
for encoders, next-token distributions (KL) for causal LMs. The loss is divided by the size of the
adapter's own effect on the batch, which makes it a direct proxy for 1 − effect retention.

Memory does not grow with the vocabulary or the number of samples. For causal LMs the teacher's
next-token distribution is kept per token as its top ``teacher_topk`` tokens only, computed once per
batch, and the loss is the KL divergence between teacher and student renormalized over those tokens: the
student's logits are formed for those K tokens alone (a [tokens, K] gather of the output head, not a
[tokens, vocabulary] product). ``teacher_topk=0`` trains on the exact KL instead, recomputing the
teacher every step and forming full logits a chunk of tokens at a time (checkpointed); README measures
what the sparse target costs in held-out retention against it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..adapter import Adapter
from ..basemodel import CHUNK_TOKENS, Base, LowRank, effect_distance, grad_precision, native_bfloat16, real_positions
from ..codec.layout import VBCode, VectorBank, untile_B
from ..retention import Retention, retention
from ..settings import CalibrationSettings, Progress
from .mixing import Mix, deterministic


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
    objective: str  # "KL", "top-K KL" (causal LMs) or "MSE" (hidden states)
    retention_before: Retention | None
    retention_after: Retention | None
    first_loss: float | None
    last_loss: float | None
    base: str | None = None  # filled in by the command: the base as given, the data used, the file
    data: str | None = None
    calibration_file: str | None = None
    frozen_bank: bool = False
    teacher_topk: int | None = None  # causal LMs: tokens per position in the teacher target (0: exact KL)
    seconds: float | None = None
    device: str = "cpu"


class BankModel(nn.Module):
    """Bank + full logits in PEFT's layout for every module, decoding to ΔW with top-k admixture."""

    def __init__(self, vb: VectorBank, adapter: Adapter, init_gap: float = 4.0):
        super().__init__()
        self.topk, self.init_gap = vb.topk, init_gap
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

    def subvectors(self) -> list[torch.Tensor]:
        """Every code's decoded sub-vectors, in the order of :attr:`logits`: ``[rows, L]`` each."""
        k = self.topk
        return [Mix.apply(self.bank, w.reshape(-1, k), i.reshape(-1, k)) for i, w in map(self.codes, range(len(self.logits)))]

    def factors(self, subvectors: list[torch.Tensor] | None = None) -> dict[str, LowRank]:
        """ΔW per module as its factors (``B: [out, r]``, ``A: [r, in]``), from ``subvectors`` when given: what
        training passes to :class:`~vbcompress.basemodel.Base`, whose gradient then never forms an ``[out, in]``
        matrix."""
        subs = self.subvectors() if subvectors is None else subvectors
        return {
            name: LowRank(
                untile_B(subs[2 * j + 1].reshape(*self.logits[2 * j + 1].shape[:-1], -1)),
                subs[2 * j].reshape(self.logits[2 * j].shape[0], -1),
            )
            for j, name in enumerate(self.names)
        }

    def deltas(self, subvectors: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """ΔW per module (``[out, in]``, transposed where the module stores it so), from ``subvectors`` when given."""
        out = {}
        for name, f in self.factors(subvectors).items():
            delta = f.B @ f.A
            out[name] = delta.T if self.layout[name] else delta
        return out

    @torch.no_grad()
    def order_entrants(self, gradients: list[torch.Tensor], spread: float = 4.0, subvectors: list[torch.Tensor] | None = None) -> None:
        """Order each code's unselected logits by where the loss gradient points.

        ``gradients``: d loss / d :meth:`subvectors` (``subvectors``: those, when the caller has them). Moving sub-vector u towards bank vector b_j changes the loss
        at the rate -g·(b_j - u)/‖b_j - u‖ per unit of distance. Unselected logits start tied ``init_gap`` below the
        weakest selected one, and top-k's gradient never reaches them, so the vector that enters when training
        lowers a selected logit is an arbitrary one of the tie; here the one towards which the loss falls fastest
        stays ``init_gap`` below and the others fall up to ``spread`` further by their rate relative to it. Only
        the order changes: the selected logits (so the decoded ΔW) and how soon a vector can enter stay as they
        were. (Lifting the best entrant to 0.5 below the threshold was measured worse: on MiniLM codes at rank 4
        and 8, Adam's first steps swapped vectors in almost every row and held-out retention fell from 0.32 to -1.69.)
        """
        subs = self.subvectors() if subvectors is None else subvectors
        for logits, g, u in zip(self.logits, gradients, subs, strict=True):
            # the loss's slope along u -> b_j, per unit of distance: the plain first-order gain per unit of mixture
            # weight favours far (large) vectors, whose second-order cost it ignores (measured worse)
            gain = ((g * u).sum(-1, keepdim=True) - g @ self.bank.T) / torch.cdist(u, self.bank).clamp_min(1e-12)  # [rows, N]
            top, idx = logits.topk(self.topk, dim=-1)
            gain = gain.reshape(logits.shape).scatter(-1, idx, -math.inf)  # relative to the best unselected vector
            rel = (gain / gain.amax(-1, keepdim=True).clamp_min(1e-30)).clamp(0, 1)
            logits.copy_((top.min(-1, keepdim=True).values - self.init_gap - spread * (1 - rel)).scatter(-1, idx, top))

    def vector_bank(self) -> VectorBank:
        codes = {}
        with torch.no_grad():
            for j, name in enumerate(self.names):
                (ia, wa), (ib, wb) = self.codes(2 * j), self.codes(2 * j + 1)
                codes[name] = VBCode(ia, wa, ib, wb)
            return VectorBank(bank=self.bank.detach().clone(), topk=self.topk, codes=codes)


class HiddenMSE:
    """Encoders: squared distance of last hidden states to the teacher's, over the adapter's own effect."""

    def __init__(self, base: Base, teacher: dict[str, torch.Tensor]):
        self.base, self.teacher = base, teacher
        self.name = "MSE"

    def targets(self, batches: list[dict]) -> list:
        return [self.target(b) for b in batches]

    def target(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.forward(batch, self.teacher), self.base.forward(batch, None)

    def loss(self, batch: dict, target, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        gap, effect = effect_distance(self.base, self.base.forward(batch, deltas), *target, batch["attention_mask"])
        return gap / effect.clamp_min(1e-12)


class TokenKL:
    """Causal LMs: KL(teacher ‖ student) of next-token distributions over real tokens, divided by KL(teacher ‖ base).

    ``topk > 0``: per token, the teacher's top-k tokens and their log-probabilities renormalized over
    them (k × 12 bytes a token); student and base are compared on those tokens only. ``topk == 0``:
    the exact KL, the teacher recomputed every step (one more forward pass, no stored targets).
    """

    def __init__(self, base: Base, teacher: dict[str, torch.Tensor], topk: int):
        self.base, self.teacher, self.topk = base, teacher, topk
        self.name = f"top-{topk} KL" if topk else "KL"

    def targets(self, batches: list[dict]) -> list:
        """Every batch's target; one bfloat16 screen of the head serves them all (:meth:`Base.top_logits`)."""
        screen = self.base.screen() if self.topk and native_bfloat16() else None
        return [self.target(b, screen) for b in batches]

    def target(self, batch: dict, screen=None):
        mask = batch["attention_mask"]
        h_t = real_positions(self.base.hidden(batch, self.teacher), mask)
        h_b = real_positions(self.base.hidden(batch, None), mask)
        if self.topk:
            # renormalized over the K tokens, so the full vocabulary's normalizer cancels: top logits suffice
            top, ids = self.base.top_logits(h_t, self.topk, screen)
            logp = torch.log_softmax(top, -1)
            effect = 0.0
            for c in range(0, len(h_b), CHUNK_TOKENS):
                lb = torch.log_softmax(self.base.logits_at(h_b[c : c + CHUNK_TOKENS], ids[c : c + CHUNK_TOKENS]), -1)
                lp = logp[c : c + CHUNK_TOKENS]
                effect += float((lp.exp() * (lp - lb)).sum())
            return ids, logp, effect
        effect = 0.0
        for c in range(0, len(h_t), CHUNK_TOKENS):
            t = torch.log_softmax(self.base.logits(h_t[c : c + CHUNK_TOKENS]), -1)
            lb = torch.log_softmax(self.base.logits(h_b[c : c + CHUNK_TOKENS]), -1)
            effect += float((t.exp() * (t - lb)).sum())
        return None, None, effect

    def loss(self, batch: dict, target, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, logp, effect = target
        h_s = real_positions(self.base.hidden(batch, deltas), batch["attention_mask"])
        if self.topk:
            ls = torch.log_softmax(self.base.logits_at(h_s, ids), -1)
            gap = (logp.exp() * (logp - ls)).sum()
        else:
            with torch.no_grad():
                h_t = real_positions(self.base.hidden(batch, self.teacher), batch["attention_mask"])
            gap = h_s.new_zeros(())
            for c in range(0, len(h_s), CHUNK_TOKENS):
                # checkpointed: a chunk's [tokens, vocabulary] logits live only while that chunk is computed
                gap = gap + checkpoint(self._exact_kl, h_s[c : c + CHUNK_TOKENS], h_t[c : c + CHUNK_TOKENS], use_reentrant=False)
        return gap / max(effect, 1e-12)

    def _exact_kl(self, h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        t = torch.log_softmax(self.base.logits(h_t), -1)
        return (t.exp() * (t - torch.log_softmax(self.base.logits(h_s), -1))).sum()


def train(groups: list[dict], steps: int, loss_at, progress: Progress | None, stage: str) -> list[float]:
    """Adam over ``groups`` with a cosine schedule for ``steps`` steps on ``loss_at(step)``; the losses."""
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    losses: list[float] = []
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 5 == 0 or step == steps - 1):
            progress(stage, step + 1, steps, math.sqrt(max(losses[-1], 0.0)))
    return losses


def length_batches(base: Base, texts: list[str], batch_size: int, gen: torch.Generator) -> list[list[str]]:
    """Texts of similar token length batched together, the batches in a seeded random order: a batch costs
    its longest text times its size, so bucketing by length cuts the padding a random batch pays for."""
    lengths = [len(ids) for ids in base.tokenizer(texts)["input_ids"]] if texts else []
    ranked = [texts[i] for i in sorted(range(len(texts)), key=lambda i: (lengths[i], i))]
    chunks = [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]


def calibrate(
    source: Adapter,
    vb: VectorBank,
    base: Base,
    texts: list[str],
    settings: CalibrationSettings,
    seed: int = 0,
    progress: Progress | None = None,
    freeze_bank: bool = False,
) -> tuple[VectorBank, CalibrationReport]:
    """Train ``vb`` so that base + bank reproduces base + ``source`` on ``texts``; returns the bank and a report.

    A held-out share of ``texts`` is never trained on; retention before/after is measured on it. With
    ``freeze_bank`` only the logits train (a bank that other adapters share must not move). Runs on
    ``base.device`` (on a GPU with torch's deterministic kernels, so that a seed gives one result).
    """
    return Calibration(source, base, texts, settings, seed).run(vb, progress, freeze_bank)


def heldout_split(texts: list[str], settings: CalibrationSettings, gen: torch.Generator) -> tuple[list[str], list[str]]:
    """(held-out, training) texts: a seeded shuffle, cut to ``settings.samples``, of which ``settings.heldout``
    are never trained on. The same seed gives the same split to calibration and to whoever measures after it."""
    order = torch.randperm(len(texts), generator=gen).tolist()
    texts = [texts[i] for i in order][: settings.samples]
    n_held = max(1, round(len(texts) * settings.heldout)) if len(texts) > 1 else 0
    return texts[:n_held], texts[n_held:] or texts


class Calibration:
    """One source's calibration problem, prepared once: the held-out split, the training batches and the
    teacher's targets on them. :meth:`run` trains any number of banks or codes against it (``add``'s floor
    search tries several ranks of one adapter; the targets, a forward pass of teacher and base over every
    batch and a top-K over the vocabulary for causal LMs, are computed only the first time)."""

    def __init__(
        self,
        source: Adapter,
        base: Base,
        texts: list[str],
        settings: CalibrationSettings,
        seed: int = 0,
        teacher: dict[str, torch.Tensor] | None = None,
    ):
        """``teacher``: ``source.delta_weights()`` when the caller already has them."""
        self.source, self.base, self.settings, self.seed = source, base, settings, seed
        gen = torch.Generator().manual_seed(seed)
        self.samples = min(len(texts), settings.samples)
        self.held, train = heldout_split(texts, settings, gen)
        self.teacher = {n: d.to(base.device) for n, d in (teacher if teacher is not None else source.delta_weights()).items()}
        topk = settings.teacher_topk
        self.objective = TokenKL(base, self.teacher, topk) if base.causal else HiddenMSE(base, self.teacher)
        self.batches = [base.encode(chunk, settings.max_length) for chunk in length_batches(base, train, settings.batch_size, gen)]
        self._targets: list | None = None

    def targets(self) -> list:
        if self._targets is None:
            with self.mode(), torch.no_grad():
                self._targets = self.objective.targets(self.batches)
        return self._targets

    def mode(self):
        """The context every step on this problem runs in: torch's deterministic kernels on a GPU (one seed, one result)."""
        return deterministic() if self.base.device.type == "cuda" else contextlib.nullcontext()

    def run(
        self,
        vb: VectorBank,
        progress: Progress | None = None,
        freeze_bank: bool = False,
        measure: bool = True,
        fixed_rows: int = 0,
        warm: bool = False,
    ) -> tuple[VectorBank, CalibrationReport]:
        """``vb`` trained on the prepared problem; with ``measure``, retention before and after on the
        held-out texts (a caller that scores the result itself passes False). ``fixed_rows``: a shared bank
        grown for this adapter, whose first rows (other adapters' vectors) are held while the rest train with
        the codes, as codes against a frozen bank do. ``warm``: ``vb``'s codes were already trained at a higher rank
        and sliced (a rank search): a short run, ``warm_steps`` (at most the full run's) without the gradient start."""
        with self.mode():
            return self._run(vb, progress, freeze_bank, measure, fixed_rows, warm)

    def _point_entrants(self, model: BankModel, batches: int) -> None:
        """LoRA-GA's idea for codes: one gradient of the loss on the first ``batches`` batches, at the starting
        codes, orders the vectors that may enter each code (:meth:`BankModel.order_entrants`)."""
        subs = [s.detach().requires_grad_() for s in model.subvectors()]
        grads = [torch.zeros_like(s) for s in subs]
        for i in range(min(batches, len(self.batches))):
            loss = self.objective.loss(self.batches[i], self.targets()[i], model.factors(subs))
            for total, g in zip(grads, torch.autograd.grad(loss, subs), strict=True):
                total += g
        model.order_entrants(grads, subvectors=[s.detach() for s in subs])

    def _run(self, vb, progress, freeze_bank, measure, fixed_rows=0, warm=False) -> tuple[VectorBank, CalibrationReport]:
        start = time.perf_counter()
        settings, base, device, held = self.settings, self.base, self.base.device, self.held if measure else []
        torch.manual_seed(self.seed)
        model = BankModel(vb, self.source).to(device)
        model.bank.requires_grad_(not freeze_bank)
        grown = fixed_rows > 0 and not freeze_bank
        if grown:
            model.bank.register_hook(lambda g: torch.cat([g.new_zeros(fixed_rows, g.shape[1]), g[fixed_rows:]]))
        with torch.no_grad():
            before = retention(base, held, self.teacher, model.deltas(), settings.max_length) if held else None
        scale = float(vb.bank.float().abs().mean()) + 1e-12
        # Codes against a frozen bank move further than a bank and its codes trained together: a step must be
        # large enough to swap which bank vectors a sub-vector mixes (settings.code_lr, measured).
        codes_only = freeze_bank or grown
        batches, targets = self.batches, self.targets()
        groups = [{"params": list(model.logits), "lr": (settings.code_lr if codes_only else settings.lr) * 10}]
        if not freeze_bank:
            # a grown bank's new rows move with the codes, at their rate (ner-r8, 16 new vectors: 0.661 → 0.700)
            groups.append({"params": [model.bank], "lr": (settings.code_lr if grown else settings.lr) * scale})
        steps, point = (settings.code_steps if codes_only else settings.steps), settings.gradient_start
        if warm:
            # codes trained at a higher rank need no gradient start (svg-r16-qv ranks 3, 4, 5: the same retention to
            # three digits without it, 4-5 s less a run)
            steps, point = min(settings.warm_steps, steps), 0

        def loss_at(step: int) -> torch.Tensor:
            i = step % len(batches)
            return self.objective.loss(batches[i], targets[i], model.factors())

        # one bfloat16 copy of the frozen weights serves the gradient start and the steps
        with base.bfloat16_backward(grad_precision(settings.backward) == "bfloat16"):
            if codes_only and point:
                self._point_entrants(model, point)
            losses = train(groups, steps, loss_at, progress, "calibrate")
        result = model.vector_bank()
        with torch.no_grad():
            after = (
                retention(base, held, self.teacher, BankModel(result, self.source).to(device).deltas(), settings.max_length)
                if held
                else None
            )
        result = VectorBank(
            bank=result.bank.cpu(),
            topk=result.topk,
            codes={n: VBCode(**{k: t.cpu() for k, t in vars(c).items()}) for n, c in result.codes.items()},
        )
        report = CalibrationReport(
            steps=steps,
            samples=self.samples,
            heldout_samples=len(self.held),
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            lr=settings.code_lr if freeze_bank else settings.lr,
            seed=self.seed,
            objective=self.objective.name,
            retention_before=before,
            retention_after=after,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            frozen_bank=freeze_bank,
            teacher_topk=settings.teacher_topk if base.causal else None,
            seconds=time.perf_counter() - start,
            device=str(device),
        )
        return result, report
