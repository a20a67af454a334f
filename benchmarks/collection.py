"""Collections on the real adapter families: what a shared bank keeps and costs against solo banks and int4.

For each family of one base in the corpus (gemma3-270m ×3, distilbert ×2, gpt2 ×2; minilm alone as the
control), N=256 and the largest L that divides every dimension (gemma: 128, as in the issue):
  (a) solo `lora2vb` of each adapter: ΔW error and bytes (bank + codes);
  (b) `pack` of the family: each adapter's ΔW error and marginal bytes;
  (c) `pack` of all but the last, then `add` of the last: that adapter's error;
and the totals: collection bytes against the sum of the solo outputs, and int4 factors (global-rank
truncation, grouped absmax) at the collection's total bytes. `add` vs solo `lora2vb` time is measured in the
same process. All errors are recomputed from files.

  python benchmarks/collection.py [--shared ../shared] [--families gemma3 distilbert gpt2 minilm]
  python benchmarks/collection.py --scale 1000 [--sample 8]   # synthetic gemma3-shaped collection
  python benchmarks/collection.py --peft-memory 8             # several adapters in one PEFT model
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vbcompress import FitSettings, load_adapter, lora2vb, write_peft_lora
from vbcompress.adapter import Adapter, LoraModule
from vbcompress.bank.pipeline import auto_vector_length
from vbcompress.baselines import bytes_per_rank, truncation
from vbcompress.collection import Collection, add, pack
from vbcompress.metrics import delta_errors

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {
    "gemma3": ["gemma3-270m-attn-r4", "gemma3-270m-attn-r4-curriculum_stage1", "gemma3-270m-attn-r4-seed123"],
    "distilbert": ["distilbert-imdb-seqcls", "distilbert-qkv-r16-bin"],
    "gpt2": ["gpt2-seqcls-cattn", "gpt2-tigrinya-causal"],
    "minilm": ["minilm-l6-bias-st"],
}
# gemma3-270m attention: (module, in, out) per layer
GEMMA_SHAPES = [("q_proj", 640, 1024), ("k_proj", 640, 256), ("v_proj", 640, 256), ("o_proj", 1024, 640)]


def rss_peak_gib() -> float:
    """This process's peak resident memory so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def rss_now_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def int4_at(adapters: list[Adapter], budget: int) -> tuple[int, list[float]]:
    """Global rank whose int4 factors of *all* adapters fit ``budget`` bytes, and each adapter's error there."""
    per_rank = sum(bytes_per_rank(a.modules.values(), 4) for a in adapters)
    rank = int(budget // per_rank)
    return rank, [truncation(a.modules.values(), int(rank * bytes_per_rank(a.modules.values(), 4)) + 1, 4).rel_error for a in adapters]


def family_rows(shared: Path, family: str, names: list[str], tmp: Path) -> None:
    paths = [shared / "adapters" / n for n in names]
    sources = [load_adapter(p) for p in paths]
    length = 128 if family == "gemma3" else auto_vector_length(sources[0])
    fit = FitSettings(num_vectors=256, vector_length=length)
    solo, solo_time = [], []
    for p in paths:
        start = time.perf_counter()
        rep = lora2vb(p, tmp / f"solo-{p.name}", fit)
        solo_time.append(time.perf_counter() - start)
        solo.append(rep)
    coll = Collection(pack(paths, tmp / f"pack-{family}", fit).collection) if len(paths) > 1 else None
    added, add_time = None, None
    if len(paths) > 1:
        pack(paths[:-1], tmp / f"pack-{family}-minus", fit)
        start = time.perf_counter()
        (added,) = add(tmp / f"pack-{family}-minus", [paths[-1]]).added
        add_time = time.perf_counter() - start
        recomputed = delta_errors(sources[-1], Collection(tmp / f"pack-{family}-minus").adapter(added.name)).total_rel_error
        assert abs(recomputed - added.rel_error) < 1e-4, (recomputed, added.rel_error)
    solo_total = sum(r.bytes.vb + r.bytes.carried for r in solo)
    for i, (name, rep) in enumerate(zip(names, solo)):
        entry = coll.entry(name) if coll else None
        last = added if (added and i == len(names) - 1) else None
        print(
            f"| {family} | {name} | {rep.total_rel_error:.3f} | {(rep.bytes.vb + rep.bytes.carried) / 1e3:.1f} KB | "
            + (
                f"{entry.rel_error:.3f} ({entry.rel_error - rep.total_rel_error:+.3f}) | {entry.marginal_bytes / 1e3:.1f} KB | "
                if entry
                else "– | – | "
            )
            + (f"{last.rel_error:.3f} ({last.rel_error - rep.total_rel_error:+.3f}) |" if last else "– |"),
            flush=True,
        )
    if coll:
        total = coll.total_bytes
        carried = sum(e.carried_bytes for e in coll.entries.values())
        rank, int4 = int4_at(sources, total - carried)
        errs = ", ".join(f"{e:.3f}" for e in int4)
        print(
            f"| {family} | **total** | | {solo_total / 1e3:.1f} KB | collection {total / 1e3:.1f} KB = **{total / solo_total:.1%}** of the solo outputs"
            f" (heads {carried / 1e3:.1f} KB included); int4 at the same bytes: rank {rank}, errors {errs} | | "
            + (f"add {add_time:.1f} s vs solo lora2vb {solo_time[-1]:.1f} s = **{add_time / solo_time[-1]:.2f}×** |" if add_time else "|"),
            flush=True,
        )


def synthetic_gemma(path: Path, seed: int, rank: int = 4, layers: int = 18, task_type: str | None = "CAUSAL_LM") -> int:
    """A gemma3-270m-shaped PEFT LoRA with random factors (cost, not fidelity)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for proj, fan_in, fan_out in GEMMA_SHAPES:
            name = f"model.layers.{layer}.self_attn.{proj}"
            modules[name] = LoraModule(
                name=name,
                A=torch.randn(rank, fan_in, generator=gen) / fan_in**0.5,
                B=torch.randn(fan_out, rank, generator=gen) * 0.01,
                scale=4.0,
            )
    adapter = Adapter(
        modules=modules,
        base_model="google/gemma-3-270m-it",
        task_type=task_type,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        source_format="peft",
    )
    write_peft_lora(adapter, path)
    return sum(m.num_params for m in modules.values())


def scale(count: int, sample: int, tmp: Path) -> None:
    fit = FitSettings(num_vectors=256, vector_length=128)
    srcs = []
    for i in range(sample):
        synthetic_gemma(tmp / f"a{i:04d}", i)
        srcs.append(tmp / f"a{i:04d}")
    start = time.perf_counter()
    pack(srcs, tmp / "coll", fit)
    pack_t = time.perf_counter() - start
    for s in srcs:
        shutil.rmtree(s)
    print(f"pack of {sample} synthetic gemma3-270m-shaped r=4 adapters: {pack_t:.1f} s, peak RSS {rss_peak_gib():.2f} GiB")
    print("| adapters in collection | mean s per add (last block) | RSS now | peak RSS so far | size on disk | disk per adapter |")
    print("|---|---|---|---|---|---|")
    block, block_t = max(1, (count - sample) // 10), 0.0
    for i in range(sample, count):
        src = tmp / f"a{i:04d}"
        synthetic_gemma(src, i)  # one source on disk and in memory at a time
        start = time.perf_counter()
        add(tmp / "coll", [src])
        block_t += time.perf_counter() - start
        shutil.rmtree(src)
        gc.collect()
        n = i + 1
        if (n - sample) % block == 0 or n == count:
            coll = Collection(tmp / "coll")
            disk = coll.disk_bytes()
            done = (n - sample - 1) % block + 1
            print(
                f"| {n} | {block_t / done:.2f} | {rss_now_gib():.2f} GiB | {rss_peak_gib():.2f} GiB | {disk / 1e6:.1f} MB | {disk / n / 1e3:.1f} KB |",
                flush=True,
            )
            block_t = 0.0


def peft_memory(count: int, tmp: Path) -> None:
    """Bytes of adapter parameters held by PEFT: one model with ``count`` adapters of a collection loaded by
    ``Collection.load_peft`` (one bank), against the same adapters unpacked and loaded one by one."""
    from peft import PeftModel
    from torch import nn

    def skeleton() -> nn.Module:
        root = nn.Module()
        for layer in range(18):
            for proj, fan_in, fan_out in GEMMA_SHAPES:
                parent = root
                for part in ("model", "layers", str(layer), "self_attn"):
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(proj, nn.Linear(fan_in, fan_out, bias=False))
        return root

    def adapter_bytes(model) -> tuple[int, int]:
        seen, bank, other = set(), 0, 0
        for name, p in model.named_parameters():
            if "vblora" not in name or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            size = p.numel() * p.element_size()
            bank, other = (bank + size, other) if "vector_bank" in name else (bank, other + size)
        return bank, other

    srcs = []
    for i in range(count):
        synthetic_gemma(tmp / f"m{i}", 1000 + i, task_type=None)  # a bare skeleton is no causal LM for PEFT
        srcs.append(tmp / f"m{i}")
    coll = Collection(pack(srcs, tmp / "mem", FitSettings(num_vectors=2048, vector_length=128, iters=2, refine_steps=10)).collection)
    names = coll.names
    shared = coll.load_peft(skeleton(), names)
    paths = coll.unpack(names, tmp / "unpacked").paths
    separate = PeftModel.from_pretrained(skeleton(), str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        separate.load_adapter(str(path), adapter_name=name)
    (sb, so), (pb, po) = adapter_bytes(shared), adapter_bytes(separate)
    print(f"{count} adapters (gemma3-270m-shaped, r=4), N=2048, L=128, in one PEFT model:")
    print("| load | bank bytes | other adapter parameters (PEFT expands codes to full logits) | total |")
    print("|---|---|---|---|")
    print(f"| unpacked adapters loaded one by one | {pb / 1e6:.1f} MB | {po / 1e6:.1f} MB | {(pb + po) / 1e6:.1f} MB |")
    print(
        f"| `Collection.load_peft` (one bank) | {sb / 1e6:.1f} MB | {so / 1e6:.1f} MB | {(sb + so) / 1e6:.1f} MB ({(sb + so) / (pb + po):.1%}) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--scale", type=int, default=0, help="build a synthetic collection of this many adapters")
    ap.add_argument("--sample", type=int, default=8, help="adapters packed before the rest are added (--scale)")
    ap.add_argument("--peft-memory", type=int, default=0, help="load this many adapters of a collection into one PEFT model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.scale:
            scale(args.scale, args.sample, tmp)
            return
        if args.peft_memory:
            peft_memory(args.peft_memory, tmp)
            return
        print("| family | adapter | solo error | solo bytes | packed error (Δ solo) | marginal bytes | pack others + add this (Δ solo) |")
        print("|---|---|---|---|---|---|---|")
        for family in args.families:
            family_rows(Path(args.shared), family, FAMILIES[family], tmp)


if __name__ == "__main__":
    sys.exit(main())
