"""Effect retention vs bytes on minilm-l6-bias-st + its base: weight-only bank, calibrated bank, SVD truncation.

Calibration uses examples/text/calibration.txt; retention is measured on examples/text/heldout.txt
(sentences from other modules, never calibrated on). All runs in this process on the same inputs.
Usage: python benchmarks/retention.py [--shared ../shared] [--steps 400]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vbcompress import load_adapter
from vbcompress.bank.calibrate import Base, read_texts, retention
from vbcompress.compress import lora2vb
from vbcompress.dense import truncate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [  # (N, L, bank dtype, rank)
    (16, 128, "float32", None),
    (32, 128, "float32", None),
    (64, 128, "float16", None),
    (64, 128, "float32", None),
    (128, 128, "float32", None),
    (64, 128, "float32", 4),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()
    adapter_dir = Path(args.shared) / "adapters" / "minilm-l6-bias-st"
    base_dir = Path(args.shared) / "bases" / "all-MiniLM-L6-v2"
    source = load_adapter(adapter_dir)
    base = Base(base_dir, source)
    held = read_texts(REPO / "examples" / "text" / "heldout.txt")
    ref = {n: m.delta_weight() for n, m in source.modules.items()}

    def score(adapter) -> float:
        return retention(base, held, ref, {n: m.delta_weight() for n, m in adapter.modules.items()}, 128)["effect_retention"]

    print(f"held-out inputs: {len(held)} sentences; calibration: {args.samples} sentences, {args.steps} steps")
    print("| method | bytes ratio | ΔW error | effect retention (held-out) |")
    print("|---|---|---|---|")
    for rank in (1, 2, 4):
        lora, _ = truncate(source, rank)
        from vbcompress.metrics import delta_errors

        print(f"| SVD truncation r={rank} (fp16) | {2 * lora.num_lora_params / source.fp16_bytes():.1%} | {delta_errors(source, lora).total_rel_error:.3f} | {score(lora):.3f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n, length, dtype, rank in CONFIGS:
            for calibrated in (False, True):
                out = Path(tmp) / f"{n}-{length}-{dtype}-r{rank}-{calibrated}"
                extra = dict(base=base_dir, calibration=REPO / "examples" / "text" / "calibration.txt", calib_steps=args.steps, calib_samples=args.samples) if calibrated else {}
                rep = lora2vb(adapter_dir, out, num_vectors=n, vector_length=length, bank_dtype=dtype, rank=rank, **extra)
                label = f"bank N={n} L={length} {dtype}" + (f" r={rank}" if rank else "") + (" + calibration" if calibrated else " (weights only)")
                print(f"| {label} | {rep['bytes']['ratio']:.1%} | {rep['total_rel_error']:.3f} | {score(load_adapter(out)):.3f} |", flush=True)


if __name__ == "__main__":
    main()
