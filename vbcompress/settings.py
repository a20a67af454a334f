"""Every default, once: one frozen dataclass per stage, each field with a one-line help.

The Python API takes these objects and the CLI builds its options from their fields (``cli.options_for``),
so a default changed here changes both. ``check`` methods raise :class:`~vbcompress.errors.SettingError`
naming the field; the CLI shows it as the matching flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

from .errors import SettingError

DEVICES = ("auto", "cpu", "cuda")
BANK_DTYPES = ("float32", "float16")
DENSE_DTYPES = ("keep", "float32", "float16", "bfloat16")
RANK_RULES = ("sara", "fro", "ratio")  # see rank.py
FORMATS = ("peft", "vblora", "kohya", "diffusers", "mlx")  # formats.REGISTRY, named here for the CLI
DENSE_FORMATS = ("peft", "kohya", "diffusers")  # the formats with a writer: what a dense LoRA can be written as
INITS = ("residual", "kmeans++")
HOLDS = ("auto", "bank", "lowrank")
GRAD_PRECISIONS = ("auto", "bfloat16", "float32")  # auto: bfloat16 where the CPU multiplies it in hardware
# The floor a collection holds every adapter to unless told otherwise: never land one that keeps less than
# half of what it does (KL retention with a base model; without one, ΔW error, which is the stricter proxy:
# on Gemma 3 270M an int4 rank-1 copy at ΔW error 0.6 still keeps 0.9 KL retention).
DEFAULT_MIN_RETENTION = 0.5
DEFAULT_MAX_ERROR = 0.5

# A long step reports (stage, step, steps, current error or loss): the CLI draws it, the library never prints.
Progress = Callable[[str, int, int, float], None]


def setting(default, help: str, *, short: str | None = None, choices: tuple | None = None, cli: bool = True, kind: type | None = None):
    """A settings field: its default and help, and how the CLI shows it (``short`` flag, ``choices``, the
    value's ``kind`` where the default is None; ``cli=False`` keeps an expert knob out of the command line)."""
    return field(default=default, metadata={"help": help, "short": short, "choices": choices, "cli": cli, "kind": kind})


def check_choices(settings) -> None:
    """Every field declared with ``choices`` holds one of them (the same list the CLI offers)."""
    for f in fields(settings):
        choices, value = f.metadata.get("choices"), getattr(settings, f.name)
        if choices and value not in choices:
            raise SettingError(f.name, f"{{setting}} must be one of {', '.join(choices)}, not {value!r}")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is a SettingError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", "{setting} cuda asked for, but torch sees no CUDA device")
    return device


def help_of(cls, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@dataclass(frozen=True)
class FitSettings:
    """How ``lora2vb`` and ``pack`` fit a vector bank to LoRA factors (weight space)."""

    num_vectors: int = setting(256, "Vectors in the bank (N). Bank bytes = N × L × 4 (float32) or × 2 (float16).", short="-N")
    vector_length: int | None = setting(
        None, "Sub-vector length L; every layer dimension must divide by it [default: largest of 256..16 that does].", short="-L"
    )
    topk: int = setting(2, "Bank vectors mixed per sub-vector (k). Codes cost k indices + k−1 float32 weights per sub-vector.", short="-k")
    rank: int | None = setting(None, "Keep the top R singular directions of every module [default: the adapter's rank].", short="-r")
    iters: int = setting(20, "Alternating assignment / closed-form bank iterations (at most; see --tol).")
    tol: float = setting(
        1e-3,
        "Stop alternating when 3 iterations improved the ΔW error by less than this fraction (or one by less than "
        "twice it), and refining when 50 steps did (0: run all --iters and --refine-steps).",
    )
    refine_steps: int = setting(300, "Adam steps on the exact ΔW error after the alternation (at most; see --tol).")
    code_refine_steps: int = setting(
        50, "Adam steps on the mixture weights when codes are fitted to a frozen bank (add to a collection)."
    )  # gemma3 on a frozen bank: assignment 0.8976, +50 steps 0.8952, +300 steps 0.8951 at 6× the time
    # One adapter's bank: 3e-3 (the first default) left the refine crawling. With stop_gain 2, 4e-2 lowers every
    # corpus row's ΔW error (mean -0.005; 8e-2 only 0.0004 more) and raises weight-only KL retention on the three
    # gemma3-270m-ner adapters (N=256: +0.02, +0.05, +0.03). A bank shared by a collection keeps 3e-3 and no
    # stop_gain (collection.encode.SHARED_BANK). The logits' rate is apart: codes fitted to a frozen bank (`add`)
    # are what they were.
    refine_lr: float = setting(4e-2, "Refinement learning rate of the bank (relative to its mean magnitude).", cli=False)
    logits_lr: float = setting(3e-2, "Refinement learning rate of the mixture logits (on their O(1) scale).", cli=False)
    # An alternation iteration costs 15-40 refine steps (measured, N=256 to 2048) and, late, gains less than they
    # do: at 7B scale 3 iterations and the refine reach ΔW error 0.9720 where 7 reached 0.9752, in 21 s, not 38.
    stop_gain: float = setting(
        2.0, "Also stop alternating once one iteration improved the ΔW error by less than this × --tol (0: off).", cli=False
    )
    candidates: int = setting(8, "Nearest vectors tried as the first mixture vector.", cli=False)
    partners: int | None = setting(128, "Nearest vectors searched for the second mixture vector (None: the whole bank).", cli=False)
    init: str = setting("residual", "Bank seeding: max-residual (measured better) or σ-weighted k-means++.", choices=INITS, cli=False)
    seed: int = setting(0, "Random seed: the same seed, input and device give byte-identical output.")
    device: str = setting("auto", "Where the fit and calibration run: auto picks cuda when torch sees one.", choices=DEVICES)

    def check(self) -> None:
        check_choices(self)
        if self.num_vectors < 1:
            raise SettingError("num_vectors", f"{{setting}} must be at least 1, not {self.num_vectors}")
        if self.vector_length is not None and self.vector_length < 1:
            raise SettingError("vector_length", f"{{setting}} must be a positive length (omit it for auto), not {self.vector_length}")
        if self.topk < 1 or self.topk > self.num_vectors:
            raise SettingError("topk", f"{{setting}} {self.topk} must be between 1 and the number of vectors {self.num_vectors}")
        if self.rank is not None and self.rank < 1:
            raise SettingError("rank", f"{{setting}} must be at least 1, not {self.rank}")
        if not 0 <= self.tol < 1:
            raise SettingError("tol", f"{{setting}} must be in [0, 1), not {self.tol}")
        for name in ("iters", "refine_steps", "code_refine_steps"):
            if getattr(self, name) < 0:
                raise SettingError(name, "{setting} must not be negative")


@dataclass(frozen=True)
class QualitySettings:
    """The floor every adapter of a collection is held to, and the representations it may be held in."""

    min_kl_retention: float | None = setting(
        None,
        "With --base: the least KL retention (effect retention for encoders) each adapter keeps on held-out text "
        f"[default: {DEFAULT_MIN_RETENTION} with --base].",
        kind=float,
    )
    max_error: float | None = setting(
        None, f"The largest ΔW error an adapter may have [default: {DEFAULT_MAX_ERROR} without --base].", kind=float
    )
    hold: str = setting(
        "auto",
        "How adapters may be held: auto = the fewest bytes that meet the floor (bank codes or int-N SVD factors); "
        "bank = bank codes only; lowrank = SVD factors only. An adapter nothing meets is refused.",
        choices=HOLDS,
    )
    grow: int = setting(
        256,
        "The most vectors an adapter may append to the bank where the bank's codes alone miss the floor and "
        "codes plus new vectors cost less than plain factors (0: never grow the bank).",
    )

    def check(self, with_base: bool) -> None:
        check_choices(self)
        if self.grow < 0:
            raise SettingError("grow", f"{{setting}} must not be negative, not {self.grow}")
        for name in ("min_kl_retention", "max_error"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise SettingError(name, f"{{setting}} must be in (0, 1], not {value}")
        if self.min_kl_retention is not None and not with_base:
            raise SettingError("min_kl_retention", "{setting} is measured on a base model: give one (--base)")

    def floor(self, with_base: bool) -> tuple[str, float]:
        """("retention", R) or ("error", E): what each adapter is held to (the defaults when none is set)."""
        if self.min_kl_retention is not None:
            return "retention", self.min_kl_retention
        if self.max_error is not None:
            return "error", self.max_error
        return ("retention", DEFAULT_MIN_RETENTION) if with_base else ("error", DEFAULT_MAX_ERROR)


@dataclass(frozen=True)
class SizeSettings:
    """Size first: a byte budget (or, with a base, a retention target) that chooses the bank size N for
    ``lora2vb`` and ``hub``; ``pack`` takes the budget for the whole collection."""

    max_bytes: int | None = setting(None, "Choose N so that the output's bank and codes fit in this many bytes (overrides -N).", kind=int)
    target_ratio: float | None = setting(
        None, "Choose N so that the output is at most this share of the LoRA at fp16, e.g. 0.05 (overrides -N).", kind=float
    )
    dry_run: bool = setting(False, "Print bytes, ratio and the plain baselines at a few N without fitting, then stop.")
    min_kl_retention: float | None = setting(
        None,
        "With --base: the smallest N (64…4096, within any byte budget) whose calibrated adapter keeps at least this "
        "retention on held-out text (KL retention for causal LMs, effect retention for encoders); each try is a fit "
        "plus a calibration, found by bisection.",
        kind=float,
    )

    def check(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 1:
            raise SettingError("max_bytes", f"{{setting}} must be positive, not {self.max_bytes}")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise SettingError("target_ratio", f"{{setting}} must be in (0, 1], not {self.target_ratio}")
        if self.max_bytes is not None and self.target_ratio is not None:
            raise SettingError("target_ratio", "give {setting} or --max-bytes, not both")
        if self.min_kl_retention is not None and not 0 < self.min_kl_retention <= 1:
            raise SettingError("min_kl_retention", f"{{setting}} must be in (0, 1], not {self.min_kl_retention}")


@dataclass(frozen=True)
class OutputSettings:
    """How a VB-LoRA adapter is written."""

    bank_dtype: str = setting("float32", "Bank precision on disk; float16 halves the bank at no measured loss.", choices=BANK_DTYPES)
    full_logits: bool = setting(False, "Write full logits (trainable further) instead of the compact top-k layout.")

    def check(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class CalibrationSettings:
    """Function-space calibration on a base model (``lora2vb --base``, ``add --base``)."""

    steps: int = setting(
        400,
        "Calibration optimizer steps when bank and logits train: lora2vb; pack with --base, the shared bank over all "
        "its adapters in turn (0: the weight-fitted bank, codes calibrated alone).",
    )
    code_steps: int = setting(100, "Calibration steps when only an adapter's codes train against a frozen bank (pack, add).")
    warm_steps: int = setting(
        25,
        "A calibrated rank search (pack, add): steps for a rank started from the codes calibrated at the nearest higher "
        "rank, sliced (at most --calib-code-steps, no gradient start; 0: every rank from its weight fit, in full).",
    )  # svg-r16-qv on the attn-r4 siblings' bank, held-out KL retention, 25 steps from rank 8's codes against 100 from the
    # weight fit: rank 3 0.420 / 0.415, rank 4 0.455 / 0.434, rank 5 0.468 / 0.465; 15 steps 0.410 / 0.441 / 0.460
    code_lr: float = setting(
        0.1, "Calibration learning rate when only codes train (pack, add; the logits take 10×)."
    )  # ner-r8 rank-1 codes on the attn-r4 siblings' bank, held-out KL retention: 400 steps at 1e-2 0.382,
    # 100 steps at 3e-2 0.481 (150), 5e-2 0.559, 1e-1 0.594, 2e-1 0.545 (benchmarks/calibrated_add.py)
    gradient_start: int = setting(
        4,
        "Codes against a frozen bank: batches whose loss gradient orders the bank vectors that may enter each code "
        "(LoRA-GA's start; 0: the unselected ones tie).",
    )  # ner-r8 rank-1 codes on the attn-r4 siblings' bank, held-out KL retention 0.594 -> 0.607 (benchmarks/calibrated_add.py)
    samples: int = setting(256, "Calibration samples (1/8 held out for the report).")
    lr: float = setting(
        1e-2, "Calibration learning rate (logits take 10×, the bank this times its mean magnitude)."
    )  # measured on minilm: 3e-3 → 0.677, 1e-2 → 0.736, 3e-2 → 0.738 held-out retention (N=64)
    batch_size: int = setting(16, "Texts per calibration batch.", cli=False)
    max_length: int = setting(64, "Tokens per calibration text (longer texts are cut).", cli=False)
    heldout: float = setting(0.125, "Share of samples kept out of training to report retention honestly.", cli=False)
    teacher_topk: int = setting(
        64, "Causal LMs: train on the teacher's top K next tokens per position (memory flat in the vocabulary); 0 = exact KL."
    )
    backward: str = setting(
        "auto",
        "Precision of the gradient through the base's linear layers on a CPU (the forward pass and the loss stay float32; "
        "auto: bfloat16 where the CPU has bfloat16 units, else float32).",
        choices=GRAD_PRECISIONS,
        cli=False,
    )  # Gemma 3 270M, ner-r8: gradients 0.3% off, KL retention 0.606 vs 0.607, ~7% faster, +0.35 GiB (benchmarks/calibrated_add.py)

    def check(self) -> None:
        negative = [n for n in ("steps", "code_steps", "warm_steps", "gradient_start") if getattr(self, n) < 0]
        if self.samples < 1:
            raise SettingError("samples", "{setting} must be positive")
        if negative:
            raise SettingError(negative[0], "{setting} must not be negative")
        for name in ("lr", "code_lr"):
            if not getattr(self, name) > 0:
                raise SettingError(name, f"{{setting}} must be positive, not {getattr(self, name)}")
        check_choices(self)
        if self.teacher_topk < 0 or self.batch_size < 1 or self.max_length < 2:
            name = "teacher_topk" if self.teacher_topk < 0 else "batch_size" if self.batch_size < 1 else "max_length"
            raise SettingError(name, f"{{setting}} {getattr(self, name)} is out of range")


@dataclass(frozen=True)
class RankSettings:
    """How ``vb2lora``/``resize`` (and ``inspect``'s effective rank) choose per-module ranks."""

    rule: str = setting(
        "sara",
        "Rank rule for --rank auto: sara = smallest k with Σσ≤k ≥ X·Σσ; fro = Σσ²≤k ≥ X²·Σσ² "
        "(X: share of ‖ΔW‖_F kept); ratio = keep σ_i > σ_max / X.",
        choices=RANK_RULES,
    )
    threshold: float = setting(0.9, "X of the rank rule.")
    dtype: str = setting("keep", "Dtype of the written factors.", choices=DENSE_DTYPES)

    def check(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class MergeSettings:
    """How ``merge`` writes the merged model."""

    dtype: str = setting("keep", "Dtype of the merged floating-point weights.", choices=DENSE_DTYPES)
    device: str = setting(
        "cpu",
        "Where ΔW is added: cpu, or cuda/auto (each weight passes through the GPU; merging is disk-bound, so cpu is the default).",
        choices=DEVICES,
    )

    def check(self) -> None:
        check_choices(self)
