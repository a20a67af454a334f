"""Fidelity: bytes ratio vs ΔW error of vbcompress on the real corpus, next to the obvious alternatives.

For each adapter and bank setting, the bank's size is the byte budget; the baselines get the same budget:
SVD truncation to one global rank at fp16, and the same truncation with per-group (64) absmax int8 / int4
quantization of the balanced factors (fp16 scale per group). All run in this process on the same input.
Usage: python benchmarks/fidelity.py [ADAPTER ...] [--shared ../shared] [--fast]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from vbcompress import load_adapter
from vbcompress.compress import auto_vector_length, lora2vb
from vbcompress.errors import VBCompressError
from vbcompress.linalg import balanced, delta_sq_error, gram_sq_norm

GROUP = 64


def quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric absmax quantization in groups of 64 consecutive values, dequantized."""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % GROUP
    g = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, GROUP)
    levels = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(1, keepdim=True) / levels).half().float().clamp_min(1e-12)
    q = (g / scale).round().clamp(-levels, levels) * scale
    return q.reshape(-1)[: flat.numel()].reshape(t.shape)


def truncation_baseline(adapter, budget: int, bytes_per_value: float) -> tuple[int, float]:
    """(rank, error) of global-rank truncation (+ quantization when bytes_per_value < 2) within ``budget``."""
    dims = sum(m.in_features + m.out_features for m in adapter.modules.values())
    overhead = 0 if bytes_per_value == 2 else 2 / GROUP
    rank = min(int(budget // (dims * (bytes_per_value + overhead))), max(adapter.ranks))
    err = ref = 0.0
    for m in adapter.modules.values():
        b, a = m.folded()
        ref += float(gram_sq_norm(b.double(), a.double()))
        if rank == 0:
            err += float(gram_sq_norm(b.double(), a.double()))
            continue
        bt, at, _ = balanced(b, a, rank)
        if bytes_per_value < 2:
            bits = round(bytes_per_value * 8)
            bt, at = quantize(bt, bits), quantize(at, bits)
        else:
            bt, at = bt.half().float(), at.half().float()
        err += delta_sq_error(b, a, bt, at)
    return rank, math.sqrt(err / ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapters", nargs="*")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--fast", action="store_true", help="fewer fit iterations (for a quick look)")
    args = ap.parse_args()
    corpus = Path(args.shared) / "adapters"
    names = args.adapters or sorted(p.name for p in corpus.iterdir() if p.is_dir())
    fit = dict(iters=5, refine_steps=50) if args.fast else {}
    print("| adapter | N | L | k | R | bytes ratio | vbcompress | SVD fp16 (rank) | int8 (rank) | int4 (rank) | best at this size | fit time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        try:
            adapter = load_adapter(corpus / name)
            length = auto_vector_length(adapter)
        except VBCompressError as e:
            print(f"| {name} | skipped: {e.problem} |||||||||||", flush=True)
            continue
        r = max(adapter.ranks)
        for n, k, rank in ((256, 2, None), (1024, 2, None), (256, 2, max(1, r // 2))):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                rep = lora2vb(corpus / name, Path(tmp) / "vb", num_vectors=n, topk=k, rank=rank, **fit)
                seconds = time.perf_counter() - start
            budget = rep["bytes"]["vb"]
            results = {"vbcompress": rep["total_rel_error"]}
            cells = []
            for label, bpv in (("SVD fp16", 2), ("int8", 1), ("int4", 0.5)):
                kr, e = truncation_baseline(adapter, budget, bpv)
                results[label] = e
                cells.append(f"{e:.3f} ({kr})")
            best = min(results, key=results.get)
            print(
                f"| {name} | {n} | {length} | {k} | {rank or r} | {rep['bytes']['ratio']:.1%} | {rep['total_rel_error']:.3f} | "
                + " | ".join(cells) + f" | {best} | {seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
