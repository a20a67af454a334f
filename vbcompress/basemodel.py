"""The base-model harness: a transformers model with an adapter's ΔW applied on the fly, calibration text,
and the metrics of what an adapter *does* (effect retention). Used by calibration and by ``eval``.

It takes local paths only; commands resolve Hub ids before they get here.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import Adapter
from .errors import FormatError, ShapeError, VBCompressError, listed, requires


def read_texts(path: str | Path) -> list[str]:
    """Calibration text: one sample per line, or JSONL with a ``text`` field."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    raw = path.read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(path, f"not UTF-8 text (a binary file?): byte {e.start} cannot be read as text") from None
    texts = []
    for n, line in enumerate(content.splitlines(), 1):
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


@dataclass(frozen=True)
class LowRank:
    """A ΔW given by its factors, ``ΔW = B @ A`` in ``[out, in]`` orientation whatever the layer's weight
    layout (``B: [out, r]``, ``A: [r, in]``). :class:`Base` adds ``(x Aᵀ) Bᵀ`` to the layer's output instead
    of ``ΔW`` to its weight: a trained ΔW's gradient is then two thin products, not an ``[out, in]`` one."""

    B: torch.Tensor
    A: torch.Tensor


class Base:
    """A transformers model (a local directory) and its tokenizer, with the adapter's layers located.

    For causal LMs the harness works on the final hidden states and forms logits itself, chunk by chunk
    and only where a loss needs them (:meth:`logits`, :meth:`logits_at`): a 262k-token vocabulary makes
    a [batch, tokens, vocabulary] tensor a gigabyte per sixteen 64-token texts.
    """

    def __init__(self, base: str | Path, adapter: Adapter, device: str = "cpu"):
        requires("peft", "models", "a base model (calibration, eval --base)")
        transformers = requires("transformers", "models", "a base model (calibration, eval --base)")
        AutoConfig, AutoModel = transformers.AutoConfig, transformers.AutoModel
        AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer

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
        tok = self.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise FormatError(base, "the tokenizer has neither a pad nor an eos token, so texts cannot be batched")
            tok.pad_token = tok.eos_token
        self.device = torch.device(device)
        self.model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.base = base
        text_config = getattr(config, "text_config", None) or config
        self.context: int | None = getattr(text_config, "max_position_embeddings", None)
        self.params = dict(self.model.named_parameters())
        self.weights: dict[str, str] = {}
        self.check(adapter)
        if self.causal:
            self._setup_head(text_config)

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
        if getattr(self, "_decoder", None) is not None and not self._inside_decoder():
            self._decoder = None  # a module outside the decoder (the head itself): full logits, exact

    def _inside_decoder(self) -> bool:
        return all(w.startswith(self._prefix) for w in self.weights.values())

    def _setup_head(self, text_config) -> None:
        """Find the decoder and the output head, and prove that ``logits(hidden)`` equals the model's own
        logits (else fall back to the model's full logits: exact, just larger)."""
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self._decoder, self._prefix = None, ""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if decoder is None or decoder is self.model or self.head is None:
            return
        prefix = next((n for n, m in self.model.named_modules() if m is decoder), None)
        self._prefix = f"{prefix}." if prefix else ""
        if not prefix or not self._inside_decoder():
            return
        # hidden() runs the decoder alone: the model's own forward would still apply the head to a token
        # per text, reading the whole [vocabulary, d] matrix (671 MB for Gemma 3) for logits nobody uses.
        self._decoder = decoder
        with torch.no_grad():
            batch = self.encode(["The quick brown fox jumps over the lazy dog."], 16)
            full = torch.func.functional_call(self.model, {}, args=(), kwargs=dict(batch), strict=False).logits[0]
            mine = self.logits(self.hidden(batch, None)[0])
        if not torch.allclose(mine, full, rtol=1e-4, atol=1e-3 * float(full.abs().max())):
            self._decoder = None

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, batch: dict, deltas: dict[str, torch.Tensor] | None, **kwargs) -> torch.Tensor:
        """Outputs with ``deltas`` (module → ΔW in the weight's layout) added to the base weights: logits
        for causal LMs, last hidden states otherwise."""
        out = self._call(batch, deltas, **kwargs)
        return out.logits if self.causal else out.last_hidden_state

    def _call(self, batch: dict, deltas: dict | None, **kwargs):
        with self._applying(deltas, self.model, "") as overrides:
            return torch.func.functional_call(self.model, overrides, args=(), kwargs={**batch, **kwargs}, strict=False)

    def hidden(self, batch: dict, deltas: dict | None) -> torch.Tensor:
        """Causal LMs: final hidden states ``[batch, tokens, d]`` (the head's input), without forming logits."""
        if self._decoder is None:
            return self.forward(batch, deltas)  # "hidden" = logits; self.logits() is then the identity
        with self._applying(deltas, self._decoder, self._prefix) as overrides:
            return torch.func.functional_call(self._decoder, overrides, args=(), kwargs=batch, strict=False).last_hidden_state

    @contextlib.contextmanager
    def _applying(self, deltas: dict | None, model: nn.Module, prefix: str):
        """``deltas`` (module → ΔW in the weight's layout, or :class:`LowRank`) on ``model``: dense ones as
        weight overrides for ``functional_call`` (yielded), low-rank ones as output hooks while inside."""
        # deltas may live elsewhere (a CPU teacher for a model on the GPU): .to is a no-op when they don't
        overrides, hooks, n = {}, [], len(prefix)
        try:
            for name, d in (deltas or {}).items():
                weight = self.weights[name]
                if isinstance(d, LowRank):
                    add = functools.partial(_add_low_rank, d.B.to(self.device), d.A.to(self.device))
                    hooks.append(model.get_submodule(name[n:]).register_forward_hook(add))
                else:
                    overrides[weight[n:]] = self.params[weight] + d.to(self.device)
            yield overrides
        finally:
            for h in hooks:
                h.remove()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of hidden states from :meth:`hidden` (``[..., d] → [..., V]``)."""
        if self._decoder is None:
            return h
        return self._cap(self.head(h))

    def logits_at(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states ``h: [T, d]`` for the tokens ``ids: [T, K]`` only (``[T, K]``)."""
        if self._decoder is None:
            return h.gather(-1, ids)
        out = torch.einsum("td,tkd->tk", h, self.head.weight[ids])
        if getattr(self.head, "bias", None) is not None:
            out = out + self.head.bias[ids]
        return self._cap(out)

    def screen(self) -> tuple[torch.Tensor, float] | None:
        """What :meth:`top_logits` screens the vocabulary with: a bfloat16 copy of the head and its largest
        row norm (V × d × 2 bytes, 335 MB for Gemma 3; the caller holds it while it needs it). None where
        screening does not apply: no separate head, a head with a bias, or a GPU (float32 is fast there, and
        torch lets cuBLAS reduce bfloat16 products in bfloat16, which the error bound does not cover)."""
        if getattr(self, "_decoder", None) is None or getattr(self.head, "bias", None) is not None or self.device.type != "cpu":
            return None
        w = self.head.weight.detach()
        return w.to(torch.bfloat16), float(w.norm(dim=1).max())

    def top_logits(self, h: torch.Tensor, k: int, screen: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest logits of hidden states ``h: [T, d]`` and their token ids (``[T, k]`` each,
        largest first): the ids of ``logits(h).topk(k)``, the logits formed for those tokens alone.

        With a ``screen`` (:meth:`screen`) a bfloat16 product ranks the vocabulary (3–4× faster than float32
        on CPUs with bf16 units) and the 2k best tokens get exact logits. A row keeps them only where its
        k-th exact logit beats every other token's screened logit by more than bfloat16's worst-case error
        (operands rounded to 8 bits, float32 accumulation, a rounded result: ≤ 2^-7.9 ‖h‖ max‖w‖ + 2^-8
        |logit|), so the tokens chosen are exactly the float32 ones; other rows are formed in float32."""
        k = min(k, h.shape[-1] if self._decoder is None else self.head.weight.shape[0])
        if screen is None or 2 * k >= screen[0].shape[0] or not len(h):
            return self._top_exact(h, k)
        head, wmax = screen
        values, ids = [], []
        for c in range(0, len(h), SCREEN_TOKENS):
            x = h[c : c + SCREEN_TOKENS]
            cut_vals, cand = (x.to(torch.bfloat16) @ head.T).topk(2 * k, -1)
            exact = torch.einsum("td,tkd->tk", x, self.head.weight[cand])  # pre-cap logits of the candidates
            v, o = exact.topk(k, -1)
            cut = cut_vals[:, -1].float()
            proven = v[:, -1] > cut + cut.abs() * 2**-8 + 2**-7.9 * x.norm(dim=1) * wmax
            v, i = self._cap(v), cand.gather(1, o)
            if not bool(proven.all()):
                rest = ~proven
                v[rest], i[rest] = self._top_exact(x[rest], k)
            values.append(v)
            ids.append(i)
        return torch.cat(values), torch.cat(ids)

    def _top_exact(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = [self.logits(h[c : c + CHUNK_TOKENS]).topk(k, -1) for c in range(0, len(h), CHUNK_TOKENS)]
        if not out:
            return h.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=h.device)
        return torch.cat([t.values for t in out]), torch.cat([t.indices for t in out])

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def check_length(self, texts: list[str], where: str | Path, max_length: int) -> None:
        """Calibration or evaluation text that the model cannot read: a line longer than its context, or a
        ``max_length`` beyond it. One error, naming the line, before any training."""
        if self.context is None:
            return
        if max_length > self.context:
            raise VBCompressError(where, f"max_length {max_length} is longer than the model's context of {self.context} tokens")
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
        long = [(i, n) for i, n in enumerate(lengths) if n > self.context]
        if long:
            i, n = long[0]
            more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
            raise FormatError(where, f"sample {i + 1} is {n} tokens, longer than the model's context of {self.context}{more}")

    @contextlib.contextmanager
    def bfloat16_backward(self, on: bool = True):
        """Inside, on a CPU: the model's linear layers (and GPT-2's Conv1D) form their inputs' gradients in
        bfloat16, a product 3–4× faster there; the forward pass, the loss and the gradients of adapted
        weights stay float32. Frozen weights are copied to bfloat16 once (2 bytes a parameter, held while
        inside)."""
        if not on or self.device.type != "cpu":
            yield
            return
        from transformers.pytorch_utils import Conv1D

        # with the decoder run alone, the head is never called as a layer: no bfloat16 copy of it
        inside = self._prefix if getattr(self, "_decoder", None) is not None else ""
        layers = [(n, m) for n, m in self.model.named_modules() if type(m) in (nn.Linear, Conv1D) and n.startswith(inside)]
        own = {n: m.__dict__["forward"] for n, m in layers if "forward" in m.__dict__}  # a hook's, put back after
        try:
            for _, m in layers:
                # adapted layers too: a low-rank ΔW leaves their weight as it is (a dense one replaces it, see below)
                m.forward = functools.partial(_bf16_grad_layer, m, m.weight, m.weight.detach().to(torch.bfloat16), isinstance(m, Conv1D))
            yield
        finally:
            for name, m in layers:
                if name in own:
                    m.forward = own[name]
                else:
                    m.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def applied(self, deltas: dict[str, torch.Tensor]):
        """The model with ``deltas`` added to its weights in place (for ``generate``); restored after."""
        saved = {n: self.params[self.weights[n]].detach().clone() for n in deltas}
        try:
            with torch.no_grad():
                for n, d in deltas.items():
                    self.params[self.weights[n]].add_(d.to(self.device))
            yield self.model
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    self.params[self.weights[n]].copy_(w)

    def data_free_texts(self, n: int, gen: torch.Generator, length: int, teacher: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Calibration text without data: random vocabulary for encoders; for causal LMs, samples of the
        model with ``teacher`` applied (the adapter's own distribution), or of the bare base."""
        tok = self.tokenizer
        if self.causal:
            start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start_id is None:
                raise FormatError(self.base, "the tokenizer has neither a bos nor an eos token to start samples from")
            start = torch.full((n, 1), start_id, device=self.device)
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            texts = []
            with self.applied(teacher or {}) as model, torch.no_grad():
                for i in range(0, n, 64):  # bounded memory: a [64, vocabulary] row of logits per step
                    ids = model.generate(start[i : i + 64], do_sample=True, max_new_tokens=length, pad_token_id=tok.pad_token_id)
                    texts += tok.batch_decode(ids, skip_special_tokens=True)
            return texts
        special = set(tok.all_special_ids)
        vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
        ids = vocab[torch.randint(len(vocab), (n, length), generator=gen)]
        return tok.batch_decode(ids)


# Token positions per chunk when full-vocabulary logits are formed (64 × 262k × 4 B = 67 MB for Gemma 3).
CHUNK_TOKENS = 64
# ... and per chunk when a bfloat16 head screens them (256 × 262k × 2 B = 134 MB): wider, as bf16 is compute-bound.
SCREEN_TOKENS = 256


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16), where a bfloat16
    product is 3–4× faster than float32; elsewhere it is emulated, and slower. Read from the CPU's flags, not
    timed, so one machine always makes the same choice (Linux; False where the flags cannot be read)."""
    try:
        return bfloat16_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def grad_precision(setting: str) -> str:
    """``CalibrationSettings.backward`` resolved: ``auto`` is bfloat16 where the CPU multiplies it in hardware."""
    return "bfloat16" if setting == "bfloat16" or (setting == "auto" and native_bfloat16()) else "float32"


def bfloat16_flags(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text names a bfloat16 multiply unit (x86 ``flags``, Arm ``Features``)."""
    lines = (line.split(":", 1)[-1].split() for line in cpuinfo.splitlines() if line.startswith(("flags", "Features")))
    return any({"avx512_bf16", "amx_bf16", "bf16"} & set(words) for words in lines)


def _bf16_grad_layer(layer: nn.Module, frozen: torch.Tensor, low: torch.Tensor, conv1d: bool, x: torch.Tensor) -> torch.Tensor:
    # the weight is read at call time: torch.func.functional_call swaps in W + ΔW for densely adapted layers,
    # whose bfloat16 copy is then made from it
    weight = layer.weight
    return _Bf16Grad.apply(x, weight, layer.bias, low if weight is frozen else None, conv1d)


def _add_low_rank(B: torch.Tensor, A: torch.Tensor, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + (args[0] @ A.T) @ B.T


class _Bf16Grad(torch.autograd.Function):
    """A linear layer's float32 forward (``F.linear``, or GPT-2 Conv1D's ``x @ W + b`` with ``W: [in, out]``);
    backward forms the input's gradient in bfloat16 (from ``low``, a frozen weight's bfloat16 copy, when
    given) and the weight's and bias's, where they train, in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, low, conv1d):
        # like torch's own linear, keep the input only where the weight's gradient needs it
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.low, ctx.conv1d = low, conv1d
        if conv1d:  # exactly transformers' Conv1D.forward
            return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.shape[1])
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            low = ctx.low if ctx.low is not None else weight.to(torch.bfloat16)
            gx = (g.to(torch.bfloat16) @ (low.T if ctx.conv1d else low)).to(g.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            gw = x2.T @ g2 if ctx.conv1d else g2.T @ x2
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


def real_positions(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, tokens, ...] → [real tokens, ...]``: padding never enters a loss or a metric."""
    return h[mask.bool()]


def effect_distance(
    base: Base, student: torch.Tensor, teacher: torch.Tensor, plain: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoders: (squared distance student↔teacher, squared size of the adapter's effect), over real tokens
    of last hidden states. (Causal LMs: see :mod:`vbcompress.bank.calibrate`'s KL targets.)"""
    m = mask[..., None].to(student.dtype)
    return ((student - teacher).square() * m).sum(), ((teacher - plain).square() * m).sum()


def pooled(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (sentence embeddings for encoders)."""
    m = mask[..., None].to(out.dtype)
    return (out * m).sum(1) / m.sum(1)
