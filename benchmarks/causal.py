"""Causal LMs: what a bank keeps of the gemma3-270m adapters' next-token distributions, on Gemma 3 270M.

For each adapter and bank size (N, L=128): weight-only fit, calibrated on file text
(examples/text/calibration.txt) and calibrated on data-free text sampled from the teacher (base + adapter);
against baselines at the same bytes: SVD truncation (fp16), int4 factors, and a LoRA of the int4 rank
initialised from the SVD and trained on the same inputs with the same loss, then stored as int4.
Every figure is measured on examples/text/heldout.txt, never calibrated on: KL retention, top-1
agreement with the teacher, perplexity. Each calibration runs in a spawned child, timed with its own peak RSS.

Build the base once: bash ../shared/bases/make_gemma3_270m.sh ~/.cache/vbcompress/gemma3-270m
Usage: python benchmarks/causal.py [--base DIR] [--adapters A ...] [--num-vectors 256 64] [--steps S]
       [--samples N] [--heldout K] [--teacher-topk K ...] [--skip file,teacher,lora] [--lora-lr LR] [--device cuda]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from vbcompress import CalibrationSettings, FitSettings, load_adapter, lora2vb
from vbcompress.bank.calibrate import HiddenMSE, TokenKL
from vbcompress.baselines import bytes_per_rank, stored_factors, truncated_factors
from vbcompress.basemodel import Base, read_texts
from vbcompress.linalg import balanced
from vbcompress.retention import retention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collection import rss_peak_gib  # noqa: E402  (VmHWM: ru_maxrss keeps a spawned child's pre-exec, i.e. the parent's, peak)

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO.parent / "shared" / "adapters"
GEMMA = Path(os.environ.get("VBCOMPRESS_GEMMA", Path.home() / ".cache" / "vbcompress" / "gemma3-270m"))
CALIBRATION = REPO / "examples" / "text" / "calibration.txt"
HELDOUT = REPO / "examples" / "text" / "heldout.txt"


def compress_child(args: dict) -> dict:
    """One lora2vb run in a fresh process: its report, wall time and peak RSS."""
    start = time.perf_counter()
    cal = CalibrationSettings(steps=args["steps"], samples=args["samples"], teacher_topk=args["topk"]) if args["base"] else None
    report = lora2vb(
        args["src"],
        args["out"],
        FitSettings(num_vectors=args["n"], vector_length=128, device=args["device"]),
        base=args["base"],
        calibration=cal,
        texts=args["texts"],
        overwrite=True,
    )
    return {
        "seconds": time.perf_counter() - start,
        "rss": rss_peak_gib(),
        "ratio": report.bytes.ratio,
        "bytes": report.bytes.vb,
        "calibration_seconds": report.calibration.seconds if report.calibration else None,
    }


def in_child(fn, args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


def truncated(source, rank: int, bits: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's top ``rank`` directions as balanced factors (B [out, r], A [r, in]): fp32 (bits 32, the
    trained LoRA's start), or as the baselines store them at 16, 8 or 4 bits."""
    if bits == 32:
        return {name: balanced(*m.folded(), rank)[:2] for name, m in source.modules.items()}
    return {name: truncated_factors(m, rank, bits) for name, m in source.modules.items()}


def as_deltas(source, factors) -> dict[str, torch.Tensor]:
    return {n: (b @ a).T if source.modules[n].transposed else b @ a for n, (b, a) in factors.items()}


def train_lora(base: Base, source, rank: int, texts: list[str], settings: CalibrationSettings, lr: float, seed: int = 0) -> dict:
    """A rank-``rank`` LoRA started at the SVD truncation and trained with calibration's loss (top-K KL for a causal
    LM, hidden-state MSE for an encoder), inputs and schedule (``settings.steps``)."""
    torch.manual_seed(seed)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    texts = [texts[i] for i in order][: settings.samples]
    train = texts[max(1, round(len(texts) * settings.heldout)) :]
    params = {
        n: (b.to(base.device).requires_grad_(True), a.to(base.device).requires_grad_(True))
        for n, (b, a) in truncated(source, rank, 32).items()
    }
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.steps))
    teacher = source.delta_weights()
    objective = TokenKL(base, teacher, settings.teacher_topk) if base.causal else HiddenMSE(base, teacher)
    batches = [base.encode(train[i : i + settings.batch_size], settings.max_length) for i in range(0, len(train), settings.batch_size)]
    with torch.no_grad():
        targets = objective.targets(batches)
    for step in range(settings.steps):
        i = step % len(batches)
        loss = objective.loss(batches[i], targets[i], as_deltas(source, params))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {n: (b.detach(), a.detach()) for n, (b, a) in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=str(GEMMA))
    ap.add_argument(
        "--adapters", nargs="*", default=["gemma3-270m-attn-r4", "gemma3-270m-attn-r4-curriculum_stage1", "gemma3-270m-attn-r4-seed123"]
    )
    ap.add_argument("--num-vectors", type=int, nargs="*", default=[256, 64])
    ap.add_argument("--steps", type=int, default=CalibrationSettings.steps)
    ap.add_argument("--samples", type=int, default=CalibrationSettings.samples)
    ap.add_argument("--heldout", type=int, default=160, help="held-out lines to measure on")
    ap.add_argument(
        "--teacher-topk",
        type=int,
        nargs="*",
        default=[CalibrationSettings.teacher_topk],
        help="several: compare sparse targets with exact (0)",
    )
    ap.add_argument(
        "--skip", default="", help="comma list of: file, teacher, lora (calibration on file text, on teacher samples, the trained LoRA)"
    )
    ap.add_argument("--lora-lr", type=float, default=CalibrationSettings.lr * 0.1, help="Adam learning rate of the trained LoRA baseline")
    ap.add_argument("--device", default="cpu", help="where calibration, the trained LoRA and the measurements run (cpu, cuda)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    held = read_texts(HELDOUT)[: args.heldout]
    settings = CalibrationSettings(steps=args.steps, samples=args.samples)
    print(
        f"Gemma 3 270M at {args.base}; calibration {args.steps} steps, {args.samples} samples; measured on {len(held)} held-out lines; "
        f"{torch.get_num_threads()} threads, device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    print(
        "| adapter | N | bytes ratio | method | KL retention | top-1 agreement | perplexity (base / teacher / candidate) | time | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.adapters:
            src = ADAPTERS / name
            source = load_adapter(src)
            base = Base(args.base, source, args.device)
            teacher = source.delta_weights()

            def row(n, ratio, method, deltas, seconds=None, rss=None, base=base, teacher=teacher, name=name):
                r = retention(base, held, teacher, deltas, settings.max_length)
                p = r.perplexity
                t = f"{seconds:.0f} s" if seconds is not None else "-"
                m = f"{rss:.2f} GiB" if rss is not None else "-"
                print(
                    f"| {name} | {n} | {ratio:.1%} | {method} | {r.kl_retention:.3f} | {r.top1_agreement:.3f} | "
                    f"{p['base']:.2f} / {p['teacher']:.2f} / {p['candidate']:.2f} | {t} | {m} |",
                    flush=True,
                )

            for n in args.num_vectors:
                out = Path(tmp) / f"{name}-{n}"
                job = {
                    "src": str(src),
                    "out": str(out),
                    "n": n,
                    "base": None,
                    "texts": None,
                    "steps": 0,
                    "samples": 0,
                    "topk": 0,
                    "device": args.device,
                }
                w = in_child(compress_child, job)
                row(n, w["ratio"], "bank, weight fit only", load_adapter(out).delta_weights(), w["seconds"], w["rss"])
                runs = [("file text", str(CALIBRATION), k) for k in args.teacher_topk] if "file" not in skip else []
                if "teacher" not in skip:
                    runs.append(("data-free, sampled from the teacher", None, args.teacher_topk[0]))
                for label, texts, topk in runs:
                    c = in_child(
                        compress_child,
                        {**job, "base": args.base, "texts": texts, "steps": args.steps, "samples": args.samples, "topk": topk},
                    )
                    what = f"bank + calibration ({label}, {'exact KL' if topk == 0 else f'top-{topk} KL'})"
                    row(n, c["ratio"], what, load_adapter(out).delta_weights(), c["calibration_seconds"], c["rss"])
                budget, fp16 = w["bytes"], source.fp16_bytes()
                for bits in (16, 4):
                    rank = min(int(budget // bytes_per_rank(source.modules.values(), bits)), max(source.ranks))
                    ratio = rank * bytes_per_rank(source.modules.values(), bits) / fp16
                    label = "SVD truncation, fp16" if bits == 16 else "SVD truncation, int4 factors"
                    row(n, ratio, f"{label} (rank {rank})", as_deltas(source, truncated(source, rank, bits)) if rank else {})
                    if bits == 4 and rank and "lora" not in skip:
                        start = time.perf_counter()
                        trained = train_lora(base, source, rank, read_texts(CALIBRATION), settings, args.lora_lr)
                        q = {k: stored_factors(b.cpu(), a.cpu(), 4) for k, (b, a) in trained.items()}
                        row(
                            n,
                            ratio,
                            f"rank-{rank} LoRA from the SVD, trained like calibration (lr {args.lora_lr:g}), int4",
                            as_deltas(source, q),
                            time.perf_counter() - start,
                        )


if __name__ == "__main__":
    main()
