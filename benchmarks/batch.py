"""Batch `add` on one machine: serial vs a local process pool vs local Ray tasks, on the same synthetic sources.

COUNT gemma3-270m-shaped r=4 adapters (random factors: cost, not fidelity) are added to copies of one packed
collection. Reports adapters per minute and peak RSS of the driver and of the workers (children's peak from
getrusage: the largest single worker), and checks the three collections hold byte-identical codes.

  python benchmarks/batch.py [--count 200] [--workers 2] [--no-ray]
  python benchmarks/batch.py --seven-b    # one add of a Llama-2-7B-shaped adapter: the cost model's input
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collection import synthetic_gemma  # noqa: E402  (the same synthetic adapters as the collection benchmark)

DRIVER = """
import json, resource, sys, time
from vbcompress.collection import add
args = json.loads(sys.argv[1])
start = time.perf_counter()
report = add(args["coll"], args["sources"], keep_going=True, workers=args["workers"], ray_address=args["ray"])
seconds = time.perf_counter() - start
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
if args["ray"]:
    import ray
    ray.shutdown()
print(json.dumps({"seconds": seconds, "added": len(report.added), "failed": len(report.failed),
                  "driver_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "worker_gib": children}))
"""


def seven_b() -> None:
    """Time one `add` of a Llama-2-7B-shaped r=16 adapter (40M LoRA parameters) to an N=2048, L=256 bank."""
    from scale import make_adapter

    from vbcompress import FitSettings
    from vbcompress.collection import add, pack

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = make_adapter(tmp / "a", 32, seed=0)
        make_adapter(tmp / "b", 32, seed=1)
        start = time.perf_counter()
        pack([tmp / "a"], tmp / "coll", FitSettings(num_vectors=2048, vector_length=256, iters=1, refine_steps=0))
        pack_s = time.perf_counter() - start
        start = time.perf_counter()
        (entry,) = add(tmp / "coll", [tmp / "b"]).added
        add_s = time.perf_counter() - start
        source = sum(p.stat().st_size for p in (tmp / "b").iterdir())
    print(
        f"7B-shaped adapter ({params / 1e6:.1f}M LoRA params, {source / 1e6:.0f} MB source): add to an N=2048, L=256 bank in "
        f"{add_s:.1f} s on this machine ({torch.get_num_threads()} threads); held as {entry.held_as}, ΔW error {entry.rel_error:.3f}, "
        f"marginal bytes {entry.marginal_bytes / 1e6:.2f} MB; setup pack with a 1-iteration fit {pack_s:.0f} s"
    )


def main() -> None:
    import json

    from vbcompress import FitSettings
    from vbcompress.collection import pack

    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--seven-b", action="store_true", help="time one add of a 7B-shaped adapter instead")
    args = ap.parse_args()
    if args.seven_b:
        return seven_b()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = []
        for i in range(args.count + 4):
            synthetic_gemma(tmp / f"s{i:04d}", 5000 + i)
            sources.append(str(tmp / f"s{i:04d}"))
        # the bank only sets the cost of encoding (N, L, k), not its quality: a short fit is enough here
        pack(sources[:4], tmp / "base-coll", FitSettings(num_vectors=256, vector_length=128, iters=2, refine_steps=10))
        runs = [("serial", 1, None), (f"--workers {args.workers}", args.workers, None)]
        if not args.no_ray:
            runs.append((f"--ray (local, {args.workers} CPUs)", 1, "local"))
        print(f"{args.count} synthetic gemma3-270m-shaped r=4 adapters added to a collection (N=256, L=128), one machine")
        print("| run | wall time | adapters / min | speed-up | driver peak RSS | largest worker peak RSS |")
        print("|---|---|---|---|---|---|")
        codes, base_t = {}, None
        for label, workers, ray in runs:
            coll = tmp / f"coll-{workers}-{ray}"
            shutil.copytree(tmp / "base-coll", coll)
            payload = json.dumps({"coll": str(coll), "sources": sources[4:], "workers": workers, "ray": ray})
            out = subprocess.run([sys.executable, "-c", DRIVER, payload], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base_t = base_t or r["seconds"]
            worker = f"{r['worker_gib']:.2f} GiB" if workers > 1 else ("(Ray workers: not children of the driver)" if ray else "-")
            print(
                f"| {label} | {r['seconds']:.0f} s | {60 * r['added'] / r['seconds']:.1f} | {base_t / r['seconds']:.2f}× | "
                f"{r['driver_gib']:.2f} GiB | {worker} |",
                flush=True,
            )
            codes[label] = {p.parent.name: p.read_bytes() for p in (coll / "adapters").glob("*/codes.safetensors")}
        same = all(c == codes["serial"] for c in codes.values())
        print(f"codes byte-identical across runs: {same}")


if __name__ == "__main__":
    main()
