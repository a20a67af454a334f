"""Function-space distillation: teach the bank what the adapter *does* on calibration inputs.

The teacher is the base model with the original LoRA's ΔW added; the student is the base with the ΔW the
bank decodes to. Bank and full logits are trained as VB-LoRA trains them (top-k admixture over the logits),
starting from the weight-space fit, so that the student's outputs match the teacher's: hidden states (MSE)
for encoders, next-token distributions (KL) for causal LMs. The loss is divided by the size of the
adapter's own effect on the batch, which makes it a direct proxy for 1 − effect retention.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapter import Adapter, VBCode, VectorBank
from ..errors import FormatError, ShapeError, VBCompressError
from .fit import Mix


@dataclass
class CalibrationSettings:
    steps: int = 400
    samples: int = 256
    batch_size: int = 16
    max_length: int = 64
    lr: float = 1e-2  # measured on minilm: 3e-3 → 0.677, 1e-2 → 0.736, 3e-2 → 0.738 held-out retention (N=64)
    seed: int = 0
    heldout: float = 0.125  # share of samples kept out of training, to report retention honestly


def read_texts(path: str | Path) -> list[str]:
    """Calibration text: one sample per line, or JSONL with a ``text`` field."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FormatError(path, f"line {n}: JSONL lines need a string field 'text'") from None
        texts.append(str(line))
    if not texts:
        raise FormatError(path, "no calibration text in the file")
    return texts


class Base:
    """A transformers model (local dir or Hub id) and its tokenizer, with the adapter's layers located."""

    def __init__(self, base: str | Path, adapter: Adapter):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        from ..hub import local_path

        base = local_path(base, "base")
        try:
            config = AutoConfig.from_pretrained(str(base))
            self.causal = adapter.task_type == "CAUSAL_LM" or any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or [])
            )
            loader = AutoModelForCausalLM if self.causal else AutoModel
            self.model = loader.from_pretrained(str(base), dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        except (OSError, ValueError) as e:
            raise VBCompressError(base, f"cannot load the base model ({str(e).splitlines()[0][:160]})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.base = base
        self.params = dict(self.model.named_parameters())
        self.weights: dict[str, str] = {}
        self.check(adapter)

    def check(self, adapter: Adapter) -> None:
        """Locate every adapter module as a linear layer of matching shape; one error listing all misfits."""
        from transformers.pytorch_utils import Conv1D

        problems = []
        for name, m in adapter.modules.items():
            try:
                layer = self.model.get_submodule(name)
            except AttributeError:
                problems.append(f"{name} (no such layer)")
                continue
            if not isinstance(layer, (nn.Linear, Conv1D)):
                problems.append(f"{name} ({type(layer).__name__}, not a linear layer)")
                continue
            shape = list(layer.weight.shape)
            expected = [m.in_features, m.out_features] if m.transposed else [m.out_features, m.in_features]
            if shape != expected:
                problems.append(f"{name} (weight {shape}, adapter ΔW {expected})")
                continue
            self.weights[name] = f"{name}.weight"
        if problems:
            shown = "; ".join(problems[:5]) + (f"; +{len(problems) - 5} more" if len(problems) > 5 else "")
            raise ShapeError(self.base, f"base model does not fit the adapter: {shown}")

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)

    def forward(self, batch: dict, deltas: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Outputs with ``deltas`` (module → ΔW in the weight's layout) added to the base weights."""
        overrides = {self.weights[n]: self.params[self.weights[n]] + d for n, d in (deltas or {}).items()}
        out = torch.func.functional_call(self.model, overrides, args=(), kwargs=dict(batch), strict=False)
        return out.logits if self.causal else out.last_hidden_state

    def data_free_texts(self, n: int, gen: torch.Generator, length: int) -> list[str]:
        """Calibration text without data: random vocabulary for encoders, samples of the base for LMs."""
        tok = self.tokenizer
        if self.causal:
            start = torch.full((n, 1), tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            with torch.no_grad():
                ids = self.model.generate(start, do_sample=True, max_new_tokens=length, pad_token_id=tok.pad_token_id)
            return tok.batch_decode(ids, skip_special_tokens=True)
        special = set(tok.all_special_ids)
        vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
        ids = vocab[torch.randint(len(vocab), (n, length), generator=gen)]
        return tok.batch_decode(ids)


def effect_distance(base: Base, student: torch.Tensor, teacher: torch.Tensor, plain: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance student↔teacher, squared size of the adapter's effect), over real tokens."""
    m = mask[..., None].to(student.dtype)
    if base.causal:
        # next-token distributions: KL(teacher ‖ student), effect = KL(teacher ‖ base)
        t = torch.log_softmax(teacher, -1)
        kl_s = (t.exp() * (t - torch.log_softmax(student, -1))).sum(-1, keepdim=True)
        kl_b = (t.exp() * (t - torch.log_softmax(plain, -1))).sum(-1, keepdim=True)
        return (kl_s * m).sum(), (kl_b * m).sum()
    return ((student - teacher).square() * m).sum(), ((teacher - plain).square() * m).sum()


def pooled(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (sentence embeddings for encoders; mean next-token logits for LMs)."""
    m = mask[..., None].to(out.dtype)
    return (out * m).sum(1) / m.sum(1)


def retention(base: Base, texts: list[str], ref: dict, cand: dict, max_length: int, batch_size: int = 32) -> dict:
    """Effect retention ``1 − ‖f_cand − f_ref‖ / ‖f_ref − f_base‖`` and mean cosine(f_cand, f_ref).

    ``f`` are mean-pooled outputs per input; ``ref``/``cand`` map module → ΔW.
    """
    outs = {"base": [], "ref": [], "cand": []}
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = base.encode(texts[i : i + batch_size], max_length)
            for key, deltas in (("base", None), ("ref", ref), ("cand", cand)):
                outs[key].append(pooled(base.forward(batch, deltas), batch["attention_mask"]))
    f = {k: torch.cat(v) for k, v in outs.items()}
    effect = (f["ref"] - f["base"]).norm()
    gap = (f["cand"] - f["ref"]).norm()
    cos = torch.nn.functional.cosine_similarity(f["cand"], f["ref"], dim=-1).mean()
    return {"effect_retention": float(1 - gap / effect) if effect > 0 else None, "mean_cosine": float(cos), "samples": len(texts)}


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
    progress: Callable[[str, int, int, float], None] | None = None,
) -> tuple[VectorBank, dict]:
    """Train ``vb`` so that base + bank reproduces base + ``source`` on ``texts``; returns the bank and a report.

    A held-out share of ``texts`` is never trained on; retention before/after is measured on it.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    order = torch.randperm(len(texts), generator=gen).tolist()
    texts = [texts[i] for i in order][: settings.samples]
    n_held = max(1, round(len(texts) * settings.heldout)) if len(texts) > 1 else 0
    held, train = texts[:n_held], texts[n_held:] or texts
    teacher = {n: m.delta_weight() for n, m in source.modules.items()}
    model = BankModel(vb, source)
    with torch.no_grad():
        before = retention(base, held, teacher, model.deltas(), settings.max_length) if held else None
    scale = float(vb.bank.float().abs().mean()) + 1e-12
    opt = torch.optim.Adam([
        {"params": [model.bank], "lr": settings.lr * scale},
        {"params": list(model.logits), "lr": settings.lr * 10},
    ])  # fmt: skip
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
    report = {
        "steps": settings.steps, "samples": len(texts), "heldout_samples": len(held), "batch_size": settings.batch_size,
        "max_length": settings.max_length, "lr": settings.lr, "seed": settings.seed, "objective": "KL" if base.causal else "MSE",
        "retention_before": before, "retention_after": after, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }  # fmt: skip
    return result, report
