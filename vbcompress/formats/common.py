"""What every LoRA reader shares: grouping factor tensors by module, checking them, computing the scale."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import CONV, EMBEDDING, LINEAR, LoraModule, natural_key
from ..errors import FormatError, ShapeError, listed


@dataclass
class Found:
    """What a reader is given: the file's tensors and safetensors metadata, the weights file, and the
    path the user named (a folder, or the file itself)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    weights: Path
    path: Path

    def sibling_json(self, name: str) -> Path:
        """``name`` beside the weights (in the named folder, or next to a lone file)."""
        return self.path / name if self.path.is_dir() else self.weights.parent / name


@dataclass(frozen=True)
class Format:
    """One adapter format: how its keys are recognised, read, and (for dense LoRA formats) written.

    ``write(adapter, out_dir, dtype, name)`` writes into the folder ``out_dir`` and returns the weights file.
    """

    name: str
    detect: Callable[[list[str]], bool]
    read: Callable[[Found], object]
    write: Callable | None = None


@dataclass
class FactorPair:
    """The raw tensors of one module as found in a file: down (A), up (B) and an optional alpha."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    kind: str = LINEAR
    keys: list[str] = field(default_factory=list)


def match_keys(
    tensors: dict[str, torch.Tensor],
    rules: list[tuple[re.Pattern, str]],
    name_of: Callable[[re.Match], str] = lambda m: m.group("name"),
    path: Path | None = None,
) -> tuple[dict[str, FactorPair], list[str]]:
    """Sort keys into factor pairs by ``rules`` (pattern → role ``down|up|alpha|down_emb|up_emb``).

    Returns the pairs by module name and the keys no rule matched.
    """
    pairs: dict[str, FactorPair] = {}
    unmatched = []
    for key, tensor in tensors.items():
        for pattern, role in rules:
            m = pattern.match(key)
            if m:
                pair = pairs.setdefault(name_of(m), FactorPair())
                pair.keys.append(key)
                if role == "alpha":
                    if tensor.numel() != 1:
                        raise FormatError(path, f"{key}: an alpha must hold one number, this one holds {tensor.numel()}")
                    pair.alpha = float(tensor.float().reshape(-1)[0])
                else:
                    if role.endswith("_emb"):
                        pair.kind = EMBEDDING
                    setattr(pair, role.removesuffix("_emb"), tensor)
                break
        else:
            unmatched.append(key)
    return pairs, unmatched


def build_module(
    name: str, pair: FactorPair, path: Path, scale_of: Callable[[str, int, float | None], float], fan_in_fan_out: bool = False
) -> LoraModule:
    """Check one pair's shapes and turn it into a :class:`LoraModule`."""
    if pair.down is None or pair.up is None:
        missing = "down/A" if pair.down is None else "up/B"
        raise FormatError(path, f"module {name}: {missing} factor missing (keys: {', '.join(pair.keys)})")
    down, up, kind, kernel = pair.down, pair.up, pair.kind, None
    if pair.kind == EMBEDDING:
        # PEFT embeddings store A [r, vocab] and B [dim, r]; same algebra as linear, applied transposed.
        pass
    elif down.dim() == 4:
        if up.dim() != 4 or up.shape[2:] != (1, 1):
            raise ShapeError(path, f"module {name}: conv LoRA up factor has shape {list(up.shape)}, expected [out, r, 1, 1]")
        kind, kernel = CONV, tuple(down.shape[2:])
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], up.shape[1])
    elif down.dim() != 2 or up.dim() != 2:
        raise ShapeError(path, f"module {name}: factors of shape {list(down.shape)} and {list(up.shape)} are not matrices")
    if down.shape[0] != up.shape[1]:
        raise ShapeError(path, f"module {name}: rank mismatch, A is {list(pair.down.shape)} but B is {list(pair.up.shape)}")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise FormatError(path, f"module {name}: factors are {down.dtype}/{up.dtype}, not floating point (a corrupt or mislabelled file)")
    r = down.shape[0]
    if r == 0 or down.shape[1] == 0 or up.shape[0] == 0:
        raise ShapeError(path, f"module {name}: empty factors {list(pair.down.shape)} and {list(pair.up.shape)}")
    scale = scale_of(name, r, pair.alpha)
    if not (math.isfinite(scale) and abs(scale) < MAX_SCALE):
        raise FormatError(path, f"module {name}: scale {scale!r} (alpha / r) is not a usable number")
    return LoraModule(
        name=name,
        A=down,
        B=up,
        scale=scale,
        fan_in_fan_out=fan_in_fan_out and kind == LINEAR,
        kind=kind,
        kernel=kernel,
        alpha=pair.alpha,
    )


def build_modules(
    pairs: dict[str, FactorPair], path: Path, scale_of: Callable[[str, int, float | None], float], fan_in_fan_out: bool = False
) -> dict[str, LoraModule]:
    """All pairs as modules, in natural order (``layers.2`` before ``layers.10``)."""
    return {name: build_module(name, pairs[name], path, scale_of, fan_in_fan_out) for name in sorted(pairs, key=natural_key)}


# lora_alpha / r beyond this is no trained adapter: it would overflow float32 in ΔW.
MAX_SCALE = 1e12


def check_config(config: dict, path: Path) -> dict:
    """Refuse a PEFT-style config whose values the readers would misuse: non-numbers, non-positive or
    non-finite sizes and alphas, patterns that are not objects of compiling regexes to positive numbers."""
    for key in ("r", "num_vectors", "vector_length", "topk"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise FormatError(path, f"invalid config: {key} = {value!r} must be a positive integer")
    alpha = config.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < MAX_SCALE * 1e6):
        raise FormatError(path, f"invalid config: lora_alpha = {alpha!r} must be a positive finite number")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise FormatError(path, f"invalid config: {key} must be an object of regex → number, not {type(patterns).__name__}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise FormatError(path, f"invalid config: {key} key {pattern!r} is not a regular expression ({e})") from None
            if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < MAX_SCALE * 1e6:
                raise FormatError(path, f"invalid config: {key}[{pattern!r}] = {value!r} must be a positive number")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise FormatError(path, f"invalid config: {key} = {config[key]!r} must be true or false")
    return config


def pattern_value(patterns: dict | None, name: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching a suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_scale(config: dict) -> Callable[[str, int, float | None], float]:
    """Scale rule of a PEFT LoRA config: ``alpha / r`` or ``alpha / sqrt(r)`` with per-module patterns."""

    def scale_of(name: str, r: int, _alpha: float | None) -> float:
        default = config.get("lora_alpha") if config.get("lora_alpha") is not None else 8  # PEFT's default
        alpha = float(pattern_value(config.get("alpha_pattern"), name, default))
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    return scale_of


def stored_alpha_scale(_name: str, r: int, alpha: float | None) -> float:
    """kohya's rule: ``alpha / r`` with the alpha stored beside the factors, ``alpha = r`` when absent."""
    return (alpha if alpha is not None else r) / r


def reject_unknown(path: Path, keys: list[str], what: str) -> None:
    if keys:
        raise FormatError(path, f"{len(keys)} unknown {what} key(s): {listed(sorted(keys), 8)}")


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FormatError(path, f"NaN/Inf values in {len(bad)} tensor(s): {', '.join(sorted(bad)[:5])}")


def dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    return ",".join(dtypes) or "none"


def header_config(metadata: dict | None, path: Path) -> dict | None:
    """The PEFT config a safetensors header carries as ``lora_adapter_metadata`` (as diffusers writes it),
    checked; None when the header has none."""
    if "lora_adapter_metadata" not in (metadata or {}):
        return None
    try:
        config = json.loads(metadata["lora_adapter_metadata"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(path, f"invalid lora_adapter_metadata JSON in safetensors header ({e.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise FormatError(path, f"lora_adapter_metadata must be a JSON object, not {type(config).__name__}")
    return check_config(config, path)


def stored_factors(m: LoraModule, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a module as files store them: cast to ``dtype`` (None keeps it), conv factors as
    ``[r, in, kh, kw]`` and ``[out, r, 1, 1]``."""
    a, b = (m.A, m.B) if dtype is None else (m.A.to(dtype), m.B.to(dtype))
    if m.kind == CONV and m.kernel is not None:
        a, b = a.reshape(m.r, -1, *m.kernel), b.reshape(*b.shape, 1, 1)
    return a.contiguous(), b.contiguous()
