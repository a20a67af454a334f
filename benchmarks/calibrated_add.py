"""Time and keep of a calibrated `add`: one gemma-3-270m adapter added with `--base` to a collection of the
three gemma3-270m-attn-r4 siblings at the default quality floor, then the codes' calibration alone at the rank
the add chose, under the settings to compare (STEPS:LR[:GRADIENT_START[:BACKWARD]]; the first is the baseline:
the defaults with a float32 backward pass).

The add runs in a spawned child (its own wall time and peak RSS) on a fresh copy of the collection. Every
retention below is KL retention on examples/text/heldout.txt, never used for calibration nor by the add's own
floor (which measures on a held-out share of the calibration file).

With ``--warm-from R --warm-ranks 3,4,5``, the rank search's short runs are compared as well: at each rank, a
full calibration from the weight fit (the baseline) against ``warm_steps`` from rank R's calibrated codes, sliced.

With ``--family``, only the adds: every gemma-3-270m adapter of the shared family that is not in the bank, each added
in its own process to a fresh copy of the collection, one table (the untrained one, all-zero B, has no effect to
keep: the table shows what the add does with it).

Build the base once: bash ../shared/bases/make_gemma3_270m.sh ~/.cache/vbcompress/gemma3-270m
Usage: python benchmarks/calibrated_add.py [--adapter NAME] [--compare STEPS:LR ...] [--warm-from R --warm-ranks R,...]
       [--heldout K] [--json FILE]
       python benchmarks/calibrated_add.py --family [NAME ...] [--heldout K] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vbcompress import CalibrationSettings, FitSettings, load_adapter
from vbcompress.bank.calibrate import BankModel, Calibration
from vbcompress.bank.pipeline import fit_settings_for, run_fit
from vbcompress.basemodel import Base, grad_precision, read_texts
from vbcompress.codec.layout import VectorBank
from vbcompress.collection import Collection, add, pack
from vbcompress.collection.hold import sliced
from vbcompress.retention import Probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal import ADAPTERS, CALIBRATION, GEMMA, HELDOUT  # noqa: E402
from collection import rss_peak_gib  # noqa: E402

SIBLINGS = ["gemma3-270m-attn-r4", "gemma3-270m-attn-r4-curriculum_stage1", "gemma3-270m-attn-r4-seed123"]
FAMILY = [
    "gemma3-270m-ner-r8",
    "gemma3-270m-ner-r16",
    "gemma3-270m-ner-quality-r16",
    "gemma3-270m-svg-r16-qv",
    "gemma3-270m-it-svg-r8-qv",
    "gemma3-270m-it-svg-untrained",
]


def add_child(args: dict) -> dict:
    """One calibrated add at the defaults, in a fresh process: wall seconds, peak RSS, how the entry is held."""
    start = time.perf_counter()
    # the siblings name gemma3-270m-it, the ner adapters the pretrained google/gemma-3-270m they were trained on
    (entry,) = add(args["coll"], [args["src"]], base=args["base"], texts=str(CALIBRATION), allow_mixed_bases=True).added
    tried = [t for t in entry.tried if t["codec"] == "bank"]
    return {
        "name": entry.name,
        "seconds": time.perf_counter() - start,
        "rss": rss_peak_gib(),
        "held_as": entry.held_as,
        "codec": entry.codec,
        "rank": entry.rank,
        "bank_tries": [(t["rank"], None if t["retention"] is None else round(t["retention"], 4), t["met"]) for t in tried],
        "floor_retention": entry.retention,
    }


def spawned_add(coll: Path, name: str, base: str) -> dict:
    """``add_child`` in a fresh process (its own wall time and peak RSS)."""
    job = {"coll": str(coll), "src": str(ADAPTERS / name), "base": base}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(add_child, (job,))


def measured(args, coll: Path, name: str, added: dict) -> tuple:
    """Fills in ``added["kl_retention"]``, what the stored adapter keeps on the held-out lines; (source, base, probe)."""
    source = load_adapter(ADAPTERS / name)
    base = Base(args.base, source)
    probe = Probe(base, read_texts(HELDOUT)[: args.heldout], source.delta_weights(), CalibrationSettings.max_length)
    added["kl_retention"] = probe.measure(Collection(coll).adapter(added["name"]).delta_weights()).headline
    return source, base, probe


def family(args, coll: Path, tmp: str) -> None:
    """Every family adapter not in the bank, each added in its own process to a fresh copy of the collection."""
    rows = []
    for i, name in enumerate(args.family or FAMILY):
        copy = Path(tmp) / f"coll-{i}"
        shutil.copytree(coll, copy)
        try:
            added = spawned_add(copy, name, args.base)
        except Exception as e:  # what the add says, as a user would read it
            rows.append({"adapter": name, "refused": str(e).splitlines()[0]})
            continue
        measured(args, copy, name, added)
        rows.append({"adapter": name, **added})
        print(rows[-1], flush=True)
    print(
        f"\ncalibrated adds to the attn-r4 siblings' collection, default settings ({torch.get_num_threads()} threads), each in its own process:"
    )
    print(
        f"| adapter | wall s | peak RSS GiB | held as | bank ranks tried (rank, floor retention, met) | KL retention ({args.heldout} held-out lines) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['adapter']} | - | - | refused: {r['refused']} | - | - |")
        else:
            print(
                f"| {r['adapter']} | {r['seconds']:.0f} | {r['rss']:.2f} | {r['held_as']} | {r['bank_tries']} | {fmt(r['kl_retention'])} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def kept(probe: Probe, vb: VectorBank, source) -> float:
    with torch.no_grad():
        return probe.measure(BankModel(vb, source).deltas()).headline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="gemma3-270m-ner-r8")
    ap.add_argument("--base", default=str(GEMMA))
    d = CalibrationSettings()
    ap.add_argument(
        "--compare",
        nargs="*",
        default=[f"{d.code_steps}:{d.code_lr}:{d.gradient_start}:float32", f"{d.code_steps}:{d.code_lr}:{d.gradient_start}:{d.backward}"],
    )
    ap.add_argument("--rank", type=int, help="the rank of codes to calibrate in the comparison [default: the add's bank rank, else 1]")
    ap.add_argument("--warm-from", type=int, help="compare short runs from this rank's calibrated codes with full ones")
    ap.add_argument("--warm-ranks", default="3,4,5", help="the ranks of that comparison")
    ap.add_argument("--heldout", type=int, default=48, help="held-out lines to measure on")
    ap.add_argument("--family", nargs="*", help="only the adds: of these family adapters (none named: every one not in the bank)")
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        coll = Path(tmp) / "coll"
        fit = FitSettings(num_vectors=256, vector_length=128)
        pack([ADAPTERS / n for n in SIBLINGS], coll, fit)
        if args.family is not None:
            family(args, coll, tmp)
            return
        bank = Collection(coll).bank
        added = spawned_add(coll, args.adapter, args.base)
        source, base, probe = measured(args, coll, args.adapter, added)

        rank = args.rank or (added["rank"] if added["codec"] == "bank" else 1)
        codes = run_fit({m: mod.folded() for m, mod in source.modules.items()}, fit_settings_for([source], fit), None, bank=bank).codes
        start = sliced(codes, rank)
        rows = [{"settings": "weight fit only", "seconds": 0.0, "kl_retention": kept(probe, VectorBank(bank, 2, start), source)}]
        texts = read_texts(CALIBRATION)
        for spec in args.compare:
            steps, lr, *more = spec.split(":")
            grad = int(more[0]) if more else CalibrationSettings.gradient_start
            backward = more[1] if len(more) > 1 else CalibrationSettings.backward
            settings = CalibrationSettings(code_steps=int(steps), code_lr=float(lr), gradient_start=grad, backward=backward)
            calibration = Calibration(source, base, texts, settings)
            t = time.perf_counter()
            trained, _ = calibration.run(VectorBank(bank, 2, start), freeze_bank=True, measure=False)
            seconds = time.perf_counter() - t
            rows.append(
                {
                    "settings": f"{steps} steps, lr {float(lr):g}, gradient start {grad}, {grad_precision(backward)} backward",
                    "seconds": seconds,
                    "kl_retention": kept(probe, trained, source),
                }
            )

        warm = []
        if args.warm_from:
            full = Calibration(source, base, texts, CalibrationSettings())
            full.targets()  # the add prepares them once for every rank it tries: not part of any run below
            top, _ = full.run(VectorBank(bank, 2, sliced(codes, args.warm_from)), freeze_bank=True, measure=False)
            for r in map(int, args.warm_ranks.split(",")):
                row = {"rank": r}
                for key, start in (("full", sliced(codes, r)), ("warm", sliced(top.codes, r))):
                    t = time.perf_counter()
                    trained, _ = full.run(VectorBank(bank, 2, start), freeze_bank=True, measure=False, warm=key == "warm")
                    row[key] = (time.perf_counter() - t, kept(probe, trained, source))
                warm.append(row)

    print(
        f"calibrated add of {args.adapter} to the attn-r4 siblings' collection, default settings ({torch.get_num_threads()} threads): "
        f"{added['seconds']:.0f} s wall, peak RSS {added['rss']:.2f} GiB; held as {added['held_as']}; bank ranks tried "
        f"(rank, floor retention, met): {added['bank_tries']}; KL retention on {args.heldout} held-out lines {fmt(added['kl_retention'])}"
    )
    base_row = rows[1] if len(rows) > 1 else rows[0]
    print(f"\ncalibration of its rank-{rank} codes against the frozen bank (the first setting is the baseline):")
    print("| calibration | seconds | × baseline | KL retention (held-out) | Δ vs baseline |")
    print("|---|---|---|---|---|")
    for r in rows:
        speed = f"{base_row['seconds'] / r['seconds']:.2f}× faster" if r["seconds"] else "-"
        print(
            f"| {r['settings']} | {r['seconds']:.0f} | {speed} | {r['kl_retention']:.3f} | {r['kl_retention'] - base_row['kl_retention']:+.3f} |"
        )
    if warm:
        d = CalibrationSettings()
        print(
            f"\na rank search's tries: {d.code_steps} steps from the weight fit (baseline) against {d.warm_steps} from rank {args.warm_from}'s codes:"
        )
        print("| rank | full: seconds | full: KL retention | warm: seconds | × baseline | warm: KL retention | Δ |")
        print("|---|---|---|---|---|---|---|")
        for w in warm:
            (fs, fk), (ws, wk) = w["full"], w["warm"]
            print(f"| {w['rank']} | {fs:.0f} | {fk:.3f} | {ws:.0f} | {fs / ws:.2f}× faster | {wk:.3f} | {wk - fk:+.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"add": added, "rank": rank, "calibration": rows, "warm": warm}, indent=1))


if __name__ == "__main__":
    main()
