"""A calibrated pack against a weight-fitted one: the three gemma3-270m-ner adapters (trained on the pretrained
Gemma 3 270M that ../shared/bases/make_gemma3_270m.sh builds, so KL retention on it is faithful) packed into one
bank (N=256, L=128), the bank then trained in function space on all three at once (`pack --base`'s default,
CalibrationSettings.steps in turn over the adapters), each adapter's codes measured at full rank and sliced to its
top directions (ranks 1, 2, 4, 8 and full), with each adapter's own top direction at int2/3/4 in the same run as
the plain baseline. KL retention on examples/text/heldout.txt, never used for calibration; bytes marginal (codes as a
collection stores them), the bank's bytes counted apart.

Usage: python benchmarks/calibrated_pack.py [--steps 400] [--heldout 48] [--rank R]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vbcompress import CalibrationSettings, FitSettings
from vbcompress.bank.calibrate import BankModel
from vbcompress.bank.shared import calibrate_shared
from vbcompress.basemodel import Base, read_texts
from vbcompress.codec.bank import BANK
from vbcompress.codec.layout import VectorBank
from vbcompress.codec.lowrank import LOWRANK
from vbcompress.collection.encode import Judging, joint_fit, load_source
from vbcompress.collection.hold import hold_lowrank, sliced
from vbcompress.retention import Probe
from vbcompress.settings import QualitySettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal import ADAPTERS, CALIBRATION, GEMMA, HELDOUT  # noqa: E402

NER = ["gemma3-270m-ner-r8", "gemma3-270m-ner-r16", "gemma3-270m-ner-quality-r16"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=CalibrationSettings.steps)
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--adapters", nargs="*", default=NER)
    ap.add_argument(
        "--rank", type=int, default=None, help="codes trained at (at most) this rank, as `pack --rank` (default: each adapter's own)"
    )
    args = ap.parse_args()
    loaded = [load_source(ADAPTERS / n, None, None) for n in args.adapters]
    fit = FitSettings(num_vectors=256, vector_length=128, rank=args.rank)
    start = time.perf_counter()
    bank, codes, run = joint_fit([s.adapter for s in loaded], fit)
    fit_s = time.perf_counter() - start
    base = Base(GEMMA, loaded[0].adapter)
    settings = CalibrationSettings(steps=args.steps)
    judging = Judging(QualitySettings(), base, CALIBRATION, settings)
    start = time.perf_counter()
    calibrations = [judging.calibration_for(s, run.seed) for s in loaded]
    for c in calibrations:
        c.targets()
    targets_s = time.perf_counter() - start
    trained, trained_codes, report = calibrate_shared(calibrations, bank, codes, run.topk)
    lines = read_texts(HELDOUT)[: args.heldout]

    rows, plain = [], []
    for s, before, after in zip(loaded, codes, trained_codes):
        probe = Probe(base, lines, s.adapter.delta_weights(), settings.max_length)
        fp16 = s.adapter.fp16_bytes()
        for bits in (2, 3, 4):  # the plain baseline, same lines: the adapter's top direction at int-N
            tensors, table = hold_lowrank(s.adapter, 1, bits)
            modules = LOWRANK.decode(tensors, table, None, 0)
            kept = probe.measure({k: m.delta_weight() for k, m in modules.items()}).headline
            plain.append((s.name, bits, LOWRANK.stored_bytes(tensors) / fp16, kept))
        for rank in sorted({r for r in (1, 2, 4, 8) if r < s.rank_cap} | {s.rank_cap}):
            row = [s.name, rank]
            for b, c in ((bank, before), (trained, after)):
                vb = VectorBank(b, run.topk, sliced(c, rank))
                with torch.no_grad():
                    kept = probe.measure(BankModel(vb, s.adapter).deltas()).headline
                size = BANK.size(vb.codes, run.topk, b.shape[0])
                row += [size / fp16, kept]
            rows.append(row)
    print(
        f"{len(loaded)} adapters, one bank N=256 L=128 ({bank.numel() * 4:,} bytes fp32), codes at rank {args.rank or 'full'}; weight fit {fit_s:.0f} s, teacher "
        f"targets {targets_s:.0f} s, shared calibration {report.steps} steps in {report.seconds:.0f} s (mean loss "
        f"{report.first_loss:.3f} → {report.last_loss:.3f}); KL retention on {args.heldout} held-out lines "
        f"({torch.get_num_threads()} threads)"
    )
    print("| adapter | codes rank | marginal bytes, % of fp16 | weight-fitted bank | calibrated pack | Δ |")
    print("|---|---|---|---|---|---|")
    for name, rank, size, w, _, c in rows:
        print(f"| {name} | {rank} | {size:.2%} | {w:.3f} | {c:.3f} | {c - w:+.3f} |")
    print("\nthe plain baseline on the same lines: each adapter's top direction (rank 1) at int-N")
    print("| adapter | bits | bytes, % of fp16 | KL retention |")
    print("|---|---|---|---|")
    for name, bits, size, kept in plain:
        print(f"| {name} | int{bits} | {size:.2%} | {kept:.3f} |")


if __name__ == "__main__":
    main()
