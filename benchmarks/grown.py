"""What a grown bank keeps: one gemma-3-270m adapter against the bank of the three gemma3-270m-attn-r4 siblings'
collection, coded at rank 1 with G new vectors appended to the bank (weight fit, then codes and new vectors
calibrated on the base, the bank's own rows held), against the frozen bank's calibrated codes and the adapter's
own top direction stored at 2, 3 and 4 bits (the plain baseline, in the same run).

Bytes are marginal: the codes as a collection stores them plus the new vectors at the bank's dtype. Every
retention is KL retention on examples/text/heldout.txt, never used for calibration.

Build the base once: bash ../shared/bases/make_gemma3_270m.sh ~/.cache/vbcompress/gemma3-270m
Usage: python benchmarks/grown.py [--adapter NAME] [--grow 16 64] [--heldout K] [--bank-dtype float16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vbcompress import CalibrationSettings, FitSettings, OutputSettings, load_adapter
from vbcompress.bank.calibrate import Calibration
from vbcompress.bank.pipeline import fit_settings_for, run_fit
from vbcompress.basemodel import Base, read_texts
from vbcompress.codec.bank import BANK
from vbcompress.codec.layout import VectorBank
from vbcompress.codec.lowrank import LOWRANK
from vbcompress.collection import Collection, pack
from vbcompress.collection.hold import hold_bank, hold_lowrank
from vbcompress.retention import Probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_add import SIBLINGS  # noqa: E402
from causal import ADAPTERS, CALIBRATION, GEMMA, HELDOUT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="gemma3-270m-ner-r8")
    ap.add_argument("--base", default=str(GEMMA))
    ap.add_argument("--grow", nargs="*", type=int, default=[16, 64])
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--bank-dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
    fit = FitSettings(num_vectors=256, vector_length=128)
    with tempfile.TemporaryDirectory() as tmp:
        pack([ADAPTERS / n for n in SIBLINGS], Path(tmp) / "c", fit, output=OutputSettings(bank_dtype=args.bank_dtype))
        bank = Collection(Path(tmp) / "c").bank
    dtype, n = bank.dtype, bank.shape[0]
    bank = bank.float()
    source = load_adapter(ADAPTERS / args.adapter)
    base = Base(args.base, source)
    probe = Probe(base, read_texts(HELDOUT)[: args.heldout], source.delta_weights(), CalibrationSettings.max_length)
    fp16 = source.fp16_bytes()
    calibration = Calibration(source, base, read_texts(CALIBRATION), CalibrationSettings())
    factors = {m: mod.folded() for m, mod in source.modules.items()}
    run = fit_settings_for([source], replace(fit, rank=1))

    rows = []
    for bits in (2, 3, 4):
        tensors, table = hold_lowrank(source, 1, bits)
        modules = LOWRANK.decode(tensors, table, None, 0)
        kept = probe.measure({k: m.delta_weight() for k, m in modules.items()}).headline
        rows.append((f"int{bits} factors r=1 (plain)", LOWRANK.stored_bytes(tensors), kept, 0.0))

    def coded(label: str, grow: int, calibrate: bool) -> None:
        start = time.perf_counter()
        result = run_fit(factors, run, None, bank=bank, grow=grow)
        vb = VectorBank(torch.cat([bank, result.bank[n:].to(dtype).float()]), run.topk, result.codes)
        if calibrate:
            vb = calibration.run(vb, freeze_bank=grow == 0, measure=False, fixed_rows=n)[0]
        grown = torch.cat([bank, vb.bank[n:].to(dtype).float()])
        assert torch.equal(grown[:n], bank), "the bank's own rows moved"
        tensors, table = hold_bank(source, vb.codes, grown, run.topk)
        modules = BANK.decode(tensors, table, grown, run.topk)
        kept = probe.measure({k: m.delta_weight() for k, m in modules.items()}).headline
        size = BANK.stored_bytes(tensors) + grow * bank.shape[1] * torch.empty(0, dtype=dtype).element_size()
        rows.append((label, size, kept, time.perf_counter() - start))
        print(f"  {label}: {size / fp16:.2%}, {kept:.3f}, {rows[-1][3]:.0f} s", flush=True)

    coded("bank codes r=1, calibrated (frozen bank)", 0, True)
    for g in args.grow:
        coded(f"bank codes r=1 + {g} vectors, weight fit only", g, False)
        coded(f"bank codes r=1 + {g} vectors, calibrated", g, True)

    print(
        f"\n{args.adapter} against the attn-r4 siblings' bank (N={n}, {args.bank_dtype}); KL retention on "
        f"{args.heldout} held-out lines; bytes marginal, % of its {fp16:,} fp16 bytes ({torch.get_num_threads()} threads)"
    )
    print("| held as | bytes | % of fp16 | KL retention | seconds |")
    print("|---|---|---|---|---|")
    for label, size, kept, seconds in sorted(rows, key=lambda r: r[1]):
        print(f"| {label} | {size:,} | {size / fp16:.2%} | {kept:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
