"""Scale: a Llama-2-7B-shaped LoRA (r=16 on q,k,v,o,gate,up,down of 32 layers, 40M parameters) into N=2048.

Each run is a child process timed with its own peak RSS (os.wait4). Baseline, in the same script: loading
the adapter and doing its factor algebra (vbcompress eval of the source against itself). Also timed against
it: `resize --rank auto` of the adapter and `vb2lora` of the lora2vb output. Usage: python benchmarks/scale.py [--layers 32] [--iters 20] [--refine-steps 300]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {  # module: (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def make_adapter(path: Path, layers: int, r: int = 16, seed: int = 0) -> int:
    """Random factors with a decaying spectrum (σ_i ∝ 0.7^i), saved as a PEFT LoRA; returns #params."""
    gen = torch.Generator().manual_seed(seed)
    tensors, decay = {}, 0.7 ** torch.arange(r, dtype=torch.float32)
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=gen) / inp**0.5 * decay[:, None]
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=gen) / r**0.5 * 0.01
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = '{"peft_type": "LORA", "r": %d, "lora_alpha": %d, "target_modules": ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}'
    (path / "adapter_config.json").write_text(cfg % (r, 2 * r))
    return sum(t.numel() for t in tensors.values())


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stdout) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, out


FIT = """
import json, sys, time
from vbcompress import FitSettings, lora2vb
args = json.loads(sys.argv[1])
marks, last = [], [0.0]
def progress(stage, i, total, err):
    now = time.perf_counter()
    if not marks or marks[-1][0] != stage:
        marks.append((stage, now))
    last[0] = now
start = time.perf_counter()
report = lora2vb(args["src"], args["out"], FitSettings(num_vectors=args["n"], iters=args["iters"], refine_steps=args["refine"], device=args["device"]), progress=progress)
end = time.perf_counter()
# each stage: from its first progress call to the next stage's (the last one: to its last call)
stages = {"load + setup": marks[0][1] - start}
for (name, t0), (_, t1) in zip(marks, marks[1:] + [(None, last[0])]):
    stages[name] = stages.get(name, 0) + t1 - t0
stages["write + measure"] = end - last[0]
print(json.dumps({"report": report.to_json(), "stages": stages}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--num-vectors", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--refine-steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "vbcompress.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "llama7b-like"
        # Build the adapter in a spawned process: a forked child inherits its parent's peak RSS on Linux.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            params = pool.apply(make_adapter, (src, args.layers))
        base_t, base_rss, _ = timed(cli + ["eval", str(src), str(src), "--json"])
        import json

        payload = {
            "src": str(src),
            "out": str(Path(tmp) / "vb"),
            "n": args.num_vectors,
            "iters": args.iters,
            "refine": args.refine_steps,
            "device": args.device,
        }
        fit_t, fit_rss, out = timed([sys.executable, "-c", FIT, json.dumps(payload)])
        result = json.loads(out.strip().splitlines()[-1])
        report = result["report"]
        resize_t, resize_rss, _ = timed(cli + ["resize", str(src), "-o", str(Path(tmp) / "auto"), "--rank", "auto", "--json"])
        dense_t, dense_rss, _ = timed(cli + ["vb2lora", payload["out"], "-o", str(Path(tmp) / "dense"), "--json"])
    print(f"adapter: {args.layers} layers, {params / 1e6:.1f}M LoRA parameters, N={args.num_vectors}, L=256, k=2, device={args.device}")
    print("| run | wall time | peak RSS | ratio to baseline time |")
    print("|---|---|---|---|")
    print(f"| baseline: load + factor algebra (eval) | {base_t:.1f} s | {base_rss:.2f} GiB | 1.0 |")
    print(f"| lora2vb (iters={args.iters}, refine={args.refine_steps}) | {fit_t:.1f} s | {fit_rss:.2f} GiB | {fit_t / base_t:.1f} |")
    print(f"| resize --rank auto (sara 0.9) | {resize_t:.1f} s | {resize_rss:.2f} GiB | {resize_t / base_t:.1f} |")
    print(f"| vb2lora of the lora2vb output (exact, full rank) | {dense_t:.1f} s | {dense_rss:.2f} GiB | {dense_t / base_t:.1f} |")
    print(
        f"ΔW error {report['total_rel_error']:.4f}, {report['bytes']['vb'] / 1e6:.2f} MB = {report['bytes']['ratio']:.2%} of fp16 LoRA; stages {report['fit_stages']}"
    )
    print(
        "where the time goes: "
        + ", ".join(f"{k} {v:.1f} s ({v / fit_t:.0%})" for k, v in result["stages"].items())
        + "; the rest: starting Python, importing torch"
    )


if __name__ == "__main__":
    main()
