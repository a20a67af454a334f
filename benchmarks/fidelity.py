"""Fidelity: bytes ratio vs ΔW error of vbcompress on the real corpus, next to the obvious alternatives.

For each adapter and bank setting, the bank's size is the byte budget; the baselines get the same budget:
SVD truncation to one global rank at fp16, and the same truncation with per-group (64) absmax int8 / int4
quantization of the balanced factors (fp16 scale per group). All run in this process on the same input.
Usage: python benchmarks/fidelity.py [ADAPTER ...] [--shared ../shared] [--fast]
       [--num-vectors N ...] [--full-rank-only] [--init residual|kmeans++] [--partners P (0: whole bank)]
The README's seeding and partner-search comparisons are runs of this script with --init / --partners.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from vbcompress import FitSettings, load_adapter, lora2vb
from vbcompress.bank.pipeline import auto_vector_length
from vbcompress.baselines import truncation
from vbcompress.errors import VBCompressError


def fmt(error: float | None) -> str:
    return "n/a" if error is None else f"{error:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapters", nargs="*")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--fast", action="store_true", help="fewer fit iterations (for a quick look)")
    ap.add_argument("--num-vectors", type=int, nargs="*", default=[256, 1024], help="bank sizes N to run")
    ap.add_argument("--full-rank-only", action="store_true", help="skip the half-rank row")
    ap.add_argument("--init", default=FitSettings.init, choices=["residual", "kmeans++"], help="bank seeding")
    ap.add_argument("--partners", type=int, default=FitSettings.partners, help="second-vector search width (0: whole bank)")
    args = ap.parse_args()
    corpus = Path(args.shared) / "adapters"
    names = args.adapters or sorted(p.name for p in corpus.iterdir() if p.is_dir())
    fit = dict(iters=5, refine_steps=50) if args.fast else {}
    fit.update(init=args.init, partners=args.partners or None)
    print(
        "| adapter | N | L | k | R | bytes ratio | vbcompress | SVD fp16 (rank) | int8 (rank) | int4 (rank) | best at this size | fit time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        try:
            adapter = load_adapter(corpus / name)
            length = auto_vector_length(adapter)
        except VBCompressError as e:
            print(f"| {name} | skipped: {e.problem} |||||||||||", flush=True)
            continue
        r = max(adapter.ranks)
        runs = [(n, 2, None) for n in args.num_vectors] + ([] if args.full_rank_only else [(args.num_vectors[0], 2, max(1, r // 2))])
        for n, k, rank in runs:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                rep = lora2vb(corpus / name, Path(tmp) / "vb", FitSettings(num_vectors=n, topk=k, rank=rank, **fit))
                seconds = time.perf_counter() - start
            results = {"vbcompress": rep.total_rel_error}
            cells = []
            for label, bits in (("SVD fp16", 16), ("int8", 8), ("int4", 4)):
                base = truncation(adapter.modules.values(), rep.bytes.vb, bits)
                results[label] = base.rel_error
                cells.append(f"{fmt(base.rel_error)} ({base.rank})")
            # an all-zero (untrained) adapter has no relative error: nothing to rank
            best = min((x for x in results if results[x] is not None), key=results.get, default="n/a")
            print(
                f"| {name} | {n} | {length} | {k} | {rank or r} | {rep.bytes.ratio:.1%} | {fmt(rep.total_rel_error)} | "
                + " | ".join(cells)
                + f" | {best} | {seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
