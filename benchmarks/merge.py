"""Merge: a synthetic sharded fp16 model (default 2 GiB in 4 shards) with an r=16 LoRA on every weight.

Baseline, same script and same files: plainly copying the shards (shutil.copytree, page cache warm).
The merge runs as a child process so its own peak RSS is measured (os.wait4) against the largest shard.
Usage: python benchmarks/merge.py [--gib 2] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

DIM = 4096


def make_model(root: Path, gib: float, shards: int) -> tuple[int, int]:
    """Shards of [4096, 4096] fp16 weights; returns (number of weights, largest shard bytes)."""
    n = max(shards, round(gib * 2**30 / (DIM * DIM * 2)))
    per = -(-n // shards)
    weight_map, largest = {}, 0
    gen = torch.Generator().manual_seed(0)
    root.mkdir()
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{i}.proj.weight": torch.randn(DIM, DIM, generator=gen).half() for i in range(s * per, min(n, (s + 1) * per))}
        save_file(tensors, root / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        largest = max(largest, (root / name).stat().st_size)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text('{"model_type": "synthetic"}')
    return n, largest


def make_lora(root: Path, n: int, r: int = 16) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(n):
        tensors[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(r, DIM, generator=gen) * 0.01
        tensors[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(DIM, r, generator=gen) * 0.01
    root.mkdir()
    save_file(tensors, root / "adapter_model.safetensors")
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["proj"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        # Build inputs in a spawned process: a forked child inherits its parent's peak RSS on Linux.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            n, largest = pool.apply(make_model, (tmp / "base", args.gib, args.shards))
            pool.apply(make_lora, (tmp / "lora", n))
        start = time.perf_counter()
        shutil.copytree(tmp / "base", tmp / "copy")
        copy_s = time.perf_counter() - start
        shutil.rmtree(tmp / "copy")
        cmd = [
            sys.executable,
            "-m",
            "vbcompress.cli",
            "merge",
            "--base",
            str(tmp / "base"),
            "--adapter",
            str(tmp / "lora"),
            "-o",
            str(tmp / "merged"),
        ]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        merge_s = time.perf_counter() - start
        if status:
            raise SystemExit("merge failed")
        total = sum(p.stat().st_size for p in (tmp / "base").glob("*.safetensors"))
    rss = usage.ru_maxrss * 1024
    print(f"model: {total / 2**30:.2f} GiB fp16 in {args.shards} shards (largest {largest / 2**30:.2f} GiB), LoRA r=16 on all {n} weights")
    print("| run | wall time | ratio to copy | peak RSS | peak RSS / largest shard |")
    print("|---|---|---|---|---|")
    print(f"| copy shards (baseline) | {copy_s:.1f} s | 1.0 | - | - |")
    print(f"| vbcompress merge | {merge_s:.1f} s | {merge_s / copy_s:.1f} | {rss / 2**30:.2f} GiB | {rss / largest:.2f} |")


if __name__ == "__main__":
    main()
