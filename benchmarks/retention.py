"""Effect retention vs bytes on minilm-l6-bias-st + its base: weight-only bank, calibrated bank, SVD truncation.

Calibration uses examples/text/calibration.txt; retention is measured on examples/text/heldout.txt
(sentences from other modules, never calibrated on). All runs in this process on the same inputs.
Usage: python benchmarks/retention.py [--shared ../shared] [--steps 400] [--lr 1e-2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from vbcompress import CalibrationSettings, FitSettings, OutputSettings, load_adapter
from vbcompress.basemodel import Base, read_texts
from vbcompress.compress import lora2vb
from vbcompress.dense import truncate
from vbcompress.metrics import delta_errors
from vbcompress.retention import retention

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [  # (N, L, bank dtype, rank, also weights-only)
    (64, 128, "float16", None, True),
    (72, 128, "float16", None, False),
    (64, 128, "float16", 4, False),
    (128, 128, "float16", None, True),
]


def trained_low_rank(source, base, texts: list[str], rank: int, steps: int, lr: float = 1e-3) -> dict:
    """The strongest plain baseline at a byte budget: a rank-r LoRA started at the SVD truncation and trained
    on the same calibration inputs and loss as the bank. Returns module → ΔW (fp16-rounded factors)."""
    from vbcompress.basemodel import effect_distance

    torch.manual_seed(0)
    params = {}
    for name, m in source.modules.items():
        u, s, vh = torch.linalg.svd(m.delta_weight(), full_matrices=False)
        root = s[:rank].sqrt()
        params[name] = (torch.nn.Parameter(u[:, :rank] * root), torch.nn.Parameter(root[:, None] * vh[:rank]))
    teacher = {n: m.delta_weight() for n, m in source.modules.items()}
    batches = [base.encode(texts[i : i + 16], 64) for i in range(0, len(texts), 16)]
    with torch.no_grad():
        targets = [(base.forward(b, teacher), base.forward(b, None)) for b in batches]
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        i = step % len(batches)
        student = base.forward(batches[i], {n: b @ a for n, (b, a) in params.items()})
        gap, effect = effect_distance(base, student, *targets[i], batches[i]["attention_mask"])
        opt.zero_grad()
        (gap / effect).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return {n: b.half().float() @ a.half().float() for n, (b, a) in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--lr", type=float, default=CalibrationSettings.lr, help="calibration learning rate (README's sweep: 3e-3, 1e-2, 3e-2)")
    args = ap.parse_args()
    adapter_dir = Path(args.shared) / "adapters" / "minilm-l6-bias-st"
    base_dir = Path(args.shared) / "bases" / "all-MiniLM-L6-v2"
    source = load_adapter(adapter_dir)
    base = Base(base_dir, source)
    held = read_texts(REPO / "examples" / "text" / "heldout.txt")
    calibration = REPO / "examples" / "text" / "calibration.txt"
    ref = {n: m.delta_weight() for n, m in source.modules.items()}

    def score(deltas: dict) -> float:
        return retention(base, held, ref, deltas, 128).effect_retention

    def deltas_of(adapter) -> dict:
        return {n: m.delta_weight() for n, m in adapter.modules.items()}

    print(f"held-out inputs: {len(held)} sentences; calibration: {args.samples} sentences (1/8 held out inside), {args.steps} steps")
    print("| method | bytes ratio | ΔW error | effect retention (held-out) |")
    print("|---|---|---|---|")
    # The trained baseline sees the same 448 training sentences as the bank's calibration.
    train = read_texts(calibration)[: args.samples * 7 // 8]
    for rank in (1, 2, 4):
        lora, _ = truncate(source, rank)
        ratio = 2 * lora.num_lora_params / source.fp16_bytes()
        print(
            f"| SVD truncation r={rank} (fp16) | {ratio:.1%} | {delta_errors(source, lora).total_rel_error:.3f} | {score(deltas_of(lora)):.3f} |",
            flush=True,
        )
        if rank < 4:
            trained = trained_low_rank(source, base, train, rank, args.steps)
            err = math.sqrt(
                sum(float((trained[n] - ref[n]).square().sum()) for n in ref) / sum(float(d.square().sum()) for d in ref.values())
            )
            print(
                f"| rank-{rank} LoRA trained on the calibration inputs (fp16) | {ratio:.1%} | {err:.3f} | {score(trained):.3f} |",
                flush=True,
            )
    with tempfile.TemporaryDirectory() as tmp:
        for n, length, dtype, rank, weights_only in CONFIGS:
            for calibrated in (False, True) if weights_only else (True,):
                out = Path(tmp) / f"{n}-{length}-{dtype}-r{rank}-{calibrated}"
                extra = (
                    {
                        "base": base_dir,
                        "texts": calibration,
                        "calibration": CalibrationSettings(steps=args.steps, samples=args.samples, lr=args.lr),
                    }
                    if calibrated
                    else {}
                )
                rep = lora2vb(
                    adapter_dir,
                    out,
                    FitSettings(num_vectors=n, vector_length=length, rank=rank),
                    output=OutputSettings(bank_dtype=dtype),
                    **extra,
                )
                label = (
                    f"bank N={n} L={length} {dtype}"
                    + (f" r={rank}" if rank else "")
                    + (" + calibration" if calibrated else " (weights only)")
                )
                print(
                    f"| {label} | {rep.bytes.ratio:.1%} | {rep.total_rel_error:.3f} | {score(deltas_of(load_adapter(out))):.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
