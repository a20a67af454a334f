"""Batch `add` on one machine: serial vs a local process pool vs local Ray tasks, on the same synthetic sources.

COUNT gemma3-270m-shaped r=4 adapters (random factors: cost, not fidelity) are added to copies of one packed
collection. Reports adapters per minute and peak RSS of the driver and of the workers (children's peak from
getrusage: the largest single worker), and checks the three collections hold byte-identical codes.

  python benchmarks/batch.py [--count 200] [--workers 2] [--no-ray]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    import json

    from vbcompress import FitSettings
    from vbcompress.collection import pack

    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
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
            print(f"| {label} | {r['seconds']:.0f} s | {60 * r['added'] / r['seconds']:.1f} | {base_t / r['seconds']:.2f}× | "
                  f"{r['driver_gib']:.2f} GiB | {worker} |", flush=True)  # fmt: skip
            codes[label] = {p.parent.name: p.read_bytes() for p in (coll / "adapters").glob("*/codes.safetensors")}
        same = all(c == codes["serial"] for c in codes.values())
        print(f"codes byte-identical across runs: {same}")


if __name__ == "__main__":
    main()
