"""The base-model harness: a transformers model with an adapter's ΔW applied on the fly, calibration text,
and the metrics of what an adapter *does* (effect retention). Used by calibration and by ``eval``.

It takes local paths only; commands resolve Hub ids before they get here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import Adapter
from .errors import FormatError, ShapeError, VBCompressError, listed


@dataclass
class Retention:
    """How much of an adapter's effect a candidate keeps on some inputs.

    ``effect_retention = 1 − ‖f_cand − f_ref‖ / ‖f_ref − f_base‖`` over mean-pooled outputs ``f``
    (None when the reference has no effect), and the mean cosine of ``f_cand`` with ``f_ref``.
    """

    effect_retention: float | None
    mean_cosine: float
    samples: int


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
    """A transformers model (a local directory) and its tokenizer, with the adapter's layers located."""

    def __init__(self, base: str | Path, adapter: Adapter):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        base = Path(base)
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
            raise ShapeError(self.base, f"base model does not fit the adapter: {listed(problems, 5, '; ')}")

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


def retention(base: Base, texts: list[str], ref: dict, cand: dict, max_length: int, batch_size: int = 32) -> Retention:
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
    return Retention(effect_retention=float(1 - gap / effect) if effect > 0 else None, mean_cosine=float(cos), samples=len(texts))
