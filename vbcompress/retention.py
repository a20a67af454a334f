"""Retention: how much of an adapter's effect a candidate keeps, measured on a base model and some texts.

A :class:`Probe` computes the base's and the reference's outputs once and then measures any number of
candidates against them: what the quality floor of a collection does for every representation it tries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .basemodel import CHUNK_TOKENS, Base, pooled, real_positions
from .settings import Progress


@dataclass
class Retention:
    """How much of an adapter's effect a candidate keeps on some inputs, against the reference ("teacher").

    Encoders: ``effect_retention = 1 − ‖f_cand − f_ref‖ / ‖f_ref − f_base‖`` over mean-pooled hidden
    states ``f`` (None when the reference has no effect), and the mean cosine of ``f_cand`` with ``f_ref``.

    Causal LMs, per next-token distribution over every real token: ``kl_retention = 1 − KL(ref‖cand) /
    KL(ref‖base)``, ``top1_agreement`` (share of tokens where cand's most likely next token is ref's) and the
    ``perplexity`` of base, ref ("teacher") and cand on the text itself. Pooled fields are None there.
    """

    effect_retention: float | None
    mean_cosine: float | None
    samples: int
    kl_retention: float | None = None
    top1_agreement: float | None = None
    perplexity: dict[str, float] | None = None  # {"base", "teacher", "candidate"}
    tokens: int | None = None
    base_top1_agreement: float | None = None  # the base alone against the reference: what 0 retention looks like

    @property
    def headline(self) -> float | None:
        """The number to quote: KL retention for causal LMs, pooled effect retention otherwise."""
        return self.kl_retention if self.kl_retention is not None else self.effect_retention


# Full-vocabulary log-probs of the teacher are kept between candidates up to this size (Gemma 3: 1 MiB per token;
# a calibrated add's 32 held-out lines ≈ 0.5 GiB); beyond it they are recomputed per candidate: the same numbers.
TEACHER_CACHE_BYTES = 512 << 20


class Probe:
    """``base``'s and ``ref``'s (module → ΔW) outputs on ``texts``, kept, so that each candidate costs one
    forward pass: hidden states of every real token (causal LMs) or pooled outputs (encoders). Causal LMs also
    keep the reference's log-probs up to ``cache_bytes``, so that a candidate forms only its own logits."""

    def __init__(
        self,
        base: Base,
        texts: list[str],
        ref: dict,
        max_length: int,
        batch_size: int = 16,
        progress: Progress | None = None,
        cache_bytes: int = TEACHER_CACHE_BYTES,
    ):
        self.base, self.samples, self.progress, self.cache_bytes = base, len(texts), progress, cache_bytes
        # by token length: sums do not depend on the order, and similar lengths waste little on padding
        texts = sorted(texts, key=lambda t: len(base.tokenizer(t)["input_ids"])) if base.causal else texts
        self.batches = [base.encode(texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)]
        self._teacher, self._kept = {}, 0  # the teacher's log-probs per chunk, while they fit in cache_bytes
        self.plain = self._all(None, "base")
        self.ref = self._all(ref, "reference")

    def _all(self, deltas: dict | None, stage: str) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            for i, batch in enumerate(self.batches):
                outs.append(self._outputs(batch, deltas))
                if self.progress is not None:
                    self.progress(stage, i + 1, len(self.batches), float("nan"))
        return outs

    def _outputs(self, batch: dict, deltas: dict | None) -> torch.Tensor:
        if self.base.causal:
            return real_positions(self.base.hidden(batch, deltas), batch["attention_mask"])
        return pooled(self.base.forward(batch, deltas), batch["attention_mask"]).cpu()

    def measure(self, cand: dict) -> Retention:
        """What ``cand`` (module → ΔW) keeps of the reference's effect: see :class:`Retention`."""
        outs = self._all(cand, "candidate")
        if self.base.causal:
            return self._lm(outs)
        f = {"base": torch.cat(self.plain), "ref": torch.cat(self.ref), "cand": torch.cat(outs)}
        effect = (f["ref"] - f["base"]).norm()
        gap = (f["cand"] - f["ref"]).norm()
        cos = torch.nn.functional.cosine_similarity(f["cand"], f["ref"], dim=-1).mean()
        return Retention(effect_retention=float(1 - gap / effect) if effect > 0 else None, mean_cosine=float(cos), samples=self.samples)

    def _chunks(self, outs: list[torch.Tensor] | None):
        """Per chunk of real tokens: (teacher log-probs, base's or candidate's hidden states, targets, valid)."""
        for i, batch in enumerate(self.batches):
            mask = batch["attention_mask"]
            # the token each position predicts, where that next token is real text
            nxt = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], 1)
            has_next = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1).bool() & mask.bool()
            target, valid = real_positions(nxt, mask), real_positions(has_next, mask)
            other = self.plain[i] if outs is None else outs[i]
            for c in range(0, len(target), CHUNK_TOKENS):
                key = (i, c)
                t = self._teacher.get(key)
                if t is None:
                    t = torch.log_softmax(self.base.logits(self.ref[i][c : c + CHUNK_TOKENS]), -1)
                    if self._kept + t.numel() * t.element_size() <= self.cache_bytes:
                        self._teacher[key] = t
                        self._kept += t.numel() * t.element_size()
                yield t, other[c : c + CHUNK_TOKENS], target[c : c + CHUNK_TOKENS], valid[c : c + CHUNK_TOKENS]

    def _lm_reference(self) -> dict:
        """What does not depend on the candidate (KL and agreement of the base, perplexities), computed once."""
        if getattr(self, "_reference", None) is None:
            sums = {"kl_base": 0.0, "agree_base": 0.0, "nll_base": 0.0, "nll_teacher": 0.0, "tokens": 0, "predicted": 0}
            with torch.no_grad():
                for t, h, tg, ok in self._chunks(None):
                    b = torch.log_softmax(self.base.logits(h), -1)
                    sums["kl_base"] += float((t.exp() * (t - b)).sum())
                    sums["agree_base"] += float((t.argmax(-1) == b.argmax(-1)).sum())
                    sums["nll_base"] -= float(b.gather(1, tg[:, None])[:, 0][ok].sum())
                    sums["nll_teacher"] -= float(t.gather(1, tg[:, None])[:, 0][ok].sum())
                    sums["tokens"] += len(tg)
                    sums["predicted"] += int(ok.sum())
            self._reference = sums
        return self._reference

    def _lm(self, outs: list[torch.Tensor]) -> Retention:
        """Causal LMs: KL retention, top-1 agreement and perplexities over every real token, with logits
        formed :data:`CHUNK_TOKENS` positions at a time (the teacher's and the candidate's: the base's figures
        are computed once per probe)."""
        ref = self._lm_reference()
        kl_cand = agree = nll_cand = 0.0
        with torch.no_grad():
            for t, h, tg, ok in self._chunks(outs):
                c = torch.log_softmax(self.base.logits(h), -1)
                kl_cand += float((t.exp() * (t - c)).sum())
                agree += float((t.argmax(-1) == c.argmax(-1)).sum())
                nll_cand -= float(c.gather(1, tg[:, None])[:, 0][ok].sum())
        tokens, predicted = ref["tokens"], ref["predicted"]
        nll = {"base": ref["nll_base"], "teacher": ref["nll_teacher"], "candidate": nll_cand}
        return Retention(
            effect_retention=None,
            mean_cosine=None,
            samples=self.samples,
            kl_retention=1 - kl_cand / ref["kl_base"] if ref["kl_base"] > 0 else None,
            top1_agreement=agree / tokens if tokens else None,
            perplexity={k: math.exp(v / predicted) for k, v in nll.items()} if predicted else None,
            tokens=int(tokens),
            base_top1_agreement=ref["agree_base"] / tokens if tokens else None,
        )


def retention(base: Base, texts: list[str], ref: dict, cand: dict, max_length: int, batch_size: int = 16) -> Retention:
    """What ``cand`` (module → ΔW) keeps of ``ref``'s effect on ``texts``: see :class:`Retention`."""
    return Probe(base, texts, ref, max_length, batch_size).measure(cand)
