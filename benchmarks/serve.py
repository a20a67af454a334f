"""Serving a collection: what the vLLM resolver costs per request, how the cache behaves under a skewed
stream, the bytes on disk against dense adapters, and the memory of a compact PEFT load.

The collection: two real gemma3-270m adapters (attn-r4 and attn-r4-seed123, q/k/v/o r=4) packed as bank codes,
then COUNT-2 clones of the first with random bank indices (serving cost does not depend on what the codes
keep). Baselines run in the same process: `unpack --dense` of one adapter (today's way to a server) for the
latency, COUNT dense PEFT folders (one measured, times COUNT: they are all the same shape) for the bytes, and
PEFT's own VB-LoRA load for the memory.

  python benchmarks/serve.py [--count 1000] [--requests 10000] [--zipf 1.1] [--cache-adapters 100] [--peft 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vbcompress import FitSettings, QualitySettings
from vbcompress.collection import Collection, pack
from vbcompress.collection.store import Manifest
from vbcompress.collection.writes import settle, write_adapter, write_manifest
from vbcompress.units import fmt_bytes
from vbcompress.vllm_plugin import CollectionResolver

SHARED = Path(__file__).resolve().parents[2] / "shared"
SOURCES = [SHARED / "adapters" / "gemma3-270m-attn-r4", SHARED / "adapters" / "gemma3-270m-attn-r4-seed123"]
GEMMA = Path(os.environ.get("VBCOMPRESS_GEMMA", Path.home() / ".cache" / "vbcompress" / "gemma3-270m"))


def build(root: Path, count: int) -> Collection:
    fit = FitSettings(num_vectors=256, vector_length=128, iters=2, refine_steps=10, code_refine_steps=5)
    pack(SOURCES, root, fit, names=["a0000", "a0001"], quality=QualitySettings(hold="bank", max_error=1.0))
    coll = Collection(root)
    entry = coll.entry("a0000")
    table, tensors = coll.files("a0000")
    gen = torch.Generator().manual_seed(0)
    manifest, n = Manifest.read(root), int(coll.manifest.settings["num_vectors"])
    names = []
    for i in range(2, count):
        name = f"a{i:04d}"
        rows, k = tensors["indices"].shape
        idx = torch.rand(rows, n, generator=gen).argsort(dim=1)[:, :k].to(tensors["indices"].dtype)  # k distinct per row, as top-k gives
        write_adapter(
            root,
            replace(entry, name=name, source=f"synthetic-{i}", source_sha256=f"{i:064x}"),
            {**tensors, "indices": idx},
            {**table, "name": name},
            manifest,
        )
        names.append(name)
    write_manifest(root, manifest)
    settle(root, names)
    return Collection(root)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def latency(coll: Collection, tmp: Path, sample: int) -> dict:
    resolver = CollectionResolver(coll.path, tmp / "lat-cache", cache_bytes=None, max_rank=16, base_model=None)
    base = coll.manifest.base_model or "base"
    names = coll.names[:sample]
    unpack_s = []
    for i, name in enumerate(names[:10]):
        start = time.perf_counter()
        Collection(coll.path).unpack([name], tmp / f"unpacked-{i}", dense=True)
        unpack_s.append(time.perf_counter() - start)

    def timed(name):
        start = time.perf_counter()
        done = resolver.materialize(base, name)
        return time.perf_counter() - start, done

    cold = [timed(n) for n in names]
    warm = [timed(n) for n in names]
    assert all(not d.hit for _, d in cold) and all(d.hit for _, d in warm)
    try:
        request = asyncio.run(resolver.resolve_lora(base, names[0]))
        via_vllm = f"vLLM LoRARequest {request.lora_int_id} → {Path(request.lora_path).name}"
    except ImportError:
        via_vllm = "vLLM not installed: timed the resolver's own materialize, which resolve_lora awaits"
    return {
        "unpack": statistics.median(unpack_s),
        "cold": [s for s, _ in cold],
        "warm": [s for s, _ in warm],
        "dense_bytes": tree_bytes(cold[0][1].path),
        "via": via_vllm,
    }


def zipf_stream(coll: Collection, tmp: Path, requests: int, s: float, cache_bytes: int) -> dict:
    rng = np.random.default_rng(0)
    ranks = np.arange(1, len(coll.names) + 1, dtype=float)
    p = ranks**-s
    picks = rng.choice(len(coll.names), size=requests, p=p / p.sum())
    resolver = CollectionResolver(coll.path, tmp / "zipf-cache", cache_bytes=cache_bytes, max_rank=16)
    base = coll.manifest.base_model or "base"
    hits, times = 0, []
    start = time.perf_counter()
    for i in picks:
        t0 = time.perf_counter()
        hits += resolver.materialize(base, coll.names[i]).hit
        times.append(time.perf_counter() - t0)
    return {
        "seconds": time.perf_counter() - start,
        "hit_rate": hits / requests,
        "mean_ms": 1e3 * float(np.mean(times)),
        "p99_ms": 1e3 * float(np.percentile(times, 99)),
        "cache_bytes": tree_bytes(tmp / "zipf-cache"),
        "distinct": len(set(picks.tolist())),
    }


def peft_memory(coll: Collection, count: int) -> dict | None:
    if not (GEMMA / "config.json").is_file():
        return None
    from transformers import AutoModelForCausalLM

    names = coll.names[:count]

    def adapter_bytes(model):
        own = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "vblora_" in n or "_vbcompress_compact_" in n]
        return sum(t.numel() * t.element_size() for t in own)

    out = {}
    for compact in (False, True):
        base = AutoModelForCausalLM.from_pretrained(GEMMA, dtype=torch.float32)
        before = sum(t.numel() * t.element_size() for t in base.parameters())
        start = time.perf_counter()
        model = coll.load_peft(base, names, compact=compact)
        out[compact] = (adapter_bytes(model), time.perf_counter() - start, before)
        del model, base
    return {"adapters": count, "peft": out[False], "compact": out[True], "codes": sum(coll.entry(n).codes_bytes for n in names)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--cache-adapters", type=int, default=100, help="cache bound, in dense adapters")
    ap.add_argument("--sample", type=int, default=50, help="distinct adapters timed cold and warm")
    ap.add_argument("--peft", type=int, default=8, help="adapters loaded into PEFT on the Gemma base (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        coll = build(tmp / "coll", args.count)
        print(
            f"collection of {len(coll.names)} gemma3-270m adapters (2 real, rest random codes) built in {time.perf_counter() - start:.0f} s"
        )
        lat = latency(coll, tmp, args.sample)
        ms = lambda xs: f"{1e3 * statistics.median(xs):.1f} ms median, {1e3 * max(xs):.1f} ms max"
        print(f"\nresolve latency ({torch.get_num_threads()} threads; {lat['via']})")
        print(f"  baseline unpack --dense of one adapter  {1e3 * lat['unpack']:.1f} ms median")
        print(
            f"  cold (decode + write dense folder)      {ms(lat['cold'])}   {lat['unpack'] / statistics.median(lat['cold']):.1f}× faster than unpack"
        )
        print(
            f"  warm (cache hit)                        {ms(lat['warm'])}   {lat['unpack'] / statistics.median(lat['warm']):.0f}× faster than unpack"
        )
        dense = lat["dense_bytes"]
        budget = args.cache_adapters * dense
        z = zipf_stream(coll, tmp, args.requests, args.zipf, budget)
        print(
            f"\nZipf(s={args.zipf}) stream: {args.requests} requests over {args.count} adapters ({z['distinct']} distinct), "
            f"cache bound {fmt_bytes(budget)} ({args.cache_adapters} dense adapters)"
        )
        print(
            f"  hit rate {z['hit_rate']:.3f}, mean {z['mean_ms']:.1f} ms, p99 {z['p99_ms']:.1f} ms per request, {z['seconds']:.0f} s in all"
        )
        held, fp16 = coll.disk_bytes(), args.count * coll.entry(coll.names[0]).source_fp16_bytes
        print("\nbytes on disk")
        print(f"  {args.count} dense adapters, LoRA factors at fp16 (the baseline)     {fmt_bytes(fp16)}")
        print(f"  {args.count} dense folders as the cache writes them (fp32, measured) {fmt_bytes(dense * args.count)}")
        print(f"  the collection                                         {fmt_bytes(held)}  ({held / fp16:.1%} of the baseline)")
        print(
            f"  collection + cache after the stream                    {fmt_bytes(held + z['cache_bytes'])}  ({(held + z['cache_bytes']) / fp16:.1%})"
        )
        mem = peft_memory(coll, args.peft) if args.peft else None
        if mem is None:
            print("\nPEFT memory: skipped (no Gemma base at $VBCOMPRESS_GEMMA, or --peft 0)")
        else:
            (full, full_s, _), (small, small_s, _) = mem["peft"], mem["compact"]
            print(f"\nPEFT load of {mem['adapters']} adapters on Gemma 3 270M (adapter tensors incl. the one shared bank)")
            print(f"  PEFT's own VB-LoRA (full logits)  {fmt_bytes(full)}  loaded in {full_s:.1f} s")
            print(f"  compact (top-k logits + indices)  {fmt_bytes(small)}  loaded in {small_s:.1f} s   {full / small:.0f}× less")
            print(f"  codes as stored in the collection {fmt_bytes(mem['codes'])}")


if __name__ == "__main__":
    sys.exit(main())
