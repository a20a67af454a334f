"""Bytes per adapter against what it keeps (KL retention on held-out text), on a real family of one base.

For each adapter of the Gemma 3 270M family in ../shared/adapters, measured on the Gemma base on held-out lines
(examples/text/heldout.txt, never used for calibration):

- **SVD truncation** at 16/8/4/3/2 bits, points of the bytes-vs-ΔW-error Pareto front (one rank for all
  modules, ``r=``, or ranks chosen per module, ``r≤``: the low-rank codec a collection falls back on; bytes are
  the stored tensors) up to ``--max-ratio``: every ``r=`` point, the least-error point within each budget, and
  ``--svd-points`` more spread over log bytes (``-1``: the whole front);
- **collection, weight-only codes**: one bank fitted jointly to the whole family (N, L below), each adapter's
  codes sliced to its top r' directions, r' = 1 … r (marginal bytes = its codes; "+bank" adds bank / family size);
- **collection, calibrated codes** (``--calibrate``): those codes trained on the base against the frozen bank
  (top-K KL on examples/text/calibration.txt) at the ranks of ``--calib-ranks``;
- **collection, calibrated pack** (``--pack``): the bank itself trained in function space on every adapter of the
  run that has an effect (``pack --base``: one teacher per adapter, ``--pack-steps`` in turn over them), codes at
  ``--pack-rank`` (``pack --rank``; default each adapter's own) sliced to r' = 1 … that rank;
- **trained LoRA** (``--trained-lora R ...``): a rank-R LoRA started at the SVD truncation, trained with the same
  loss, inputs and steps as the calibrated codes (``--calib-steps``, lr ``--lora-lr``), stored at 16/8/4 bits;
- **lorashare** (``--lorashare``, the `bench` extra): the SHARE method (a shared PCA basis per layer and side,
  per-adapter loadings) at k = 1, 2, 4, on the subsets it accepts (one rank, one base name, one target set);
  bytes at fp16: loadings per adapter, plus the basis / subset size.

Then, at 1, 2, 3, 5, 10 and 20 % of each adapter's fp16 bytes, the mean over the trained adapters of the best
retention each method reaches within that budget, and a plot (``--plot``, matplotlib from the `bench` extra).

``--family minilm`` runs the three MiniLM adapters on ../shared/bases/all-MiniLM-L6-v2 instead (effect retention of
hidden states, the encoder's measure, in place of KL retention).

    python benchmarks/frontier.py --calibrate gemma3-270m-ner-r8 --lorashare --plot docs/frontier.png
    python benchmarks/frontier.py --family minilm --pack --calibrate all --trained-lora 1 --lorashare
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbcompress import FitSettings, load_adapter  # noqa: E402
from vbcompress.bank.calibrate import Calibration, calibrate  # noqa: E402
from vbcompress.bank.shared import calibrate_shared  # noqa: E402
from vbcompress.baselines import stored_factors  # noqa: E402
from vbcompress.basemodel import Base, read_texts  # noqa: E402
from vbcompress.codec.bank import BANK  # noqa: E402
from vbcompress.codec.layout import VectorBank  # noqa: E402
from vbcompress.codec.lowrank import LOWRANK  # noqa: E402
from vbcompress.collection.encode import joint_fit  # noqa: E402
from vbcompress.collection.hold import hold_bank, hold_lowrank, sliced  # noqa: E402
from vbcompress.collection.ladder import lowrank_front  # noqa: E402
from vbcompress.linalg import balanced  # noqa: E402
from vbcompress.retention import Probe  # noqa: E402
from vbcompress.settings import CalibrationSettings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal import as_deltas, train_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VBCOMPRESS_SHARED", ROOT.parent / "shared"))
GEMMA = Path(os.environ.get("VBCOMPRESS_GEMMA", Path.home() / ".cache" / "vbcompress" / "gemma3-270m"))
FAMILY = [
    "gemma3-270m-attn-r4",
    "gemma3-270m-attn-r4-curriculum_stage1",
    "gemma3-270m-attn-r4-seed123",
    "gemma3-270m-ner-r8",
    "gemma3-270m-ner-r16",
    "gemma3-270m-ner-quality-r16",
    "gemma3-270m-it-svg-r8-qv",
    "gemma3-270m-svg-r16-qv",
    "gemma3-270m-it-svg-untrained",
]
BUDGETS = (0.01, 0.02, 0.03, 0.05, 0.10, 0.20)
LORASHARE_SUBSETS = (FAMILY[:3], ["gemma3-270m-ner-r16", "gemma3-270m-ner-quality-r16"])
MINILM = ["minilm-l6-bias-st", "minilm-l6-contract-r4", "minilm-l6-contract-r4-dropout"]
FAMILIES = {  # name: (adapters, base, lorashare's subsets: one rank and target set each)
    "gemma": (FAMILY, GEMMA, LORASHARE_SUBSETS),
    "minilm": (MINILM, SHARED / "bases" / "all-MiniLM-L6-v2", (MINILM[1:],)),
}


def lorashare_rows(adapters: dict, probes: dict, ks: tuple[int, ...], subsets) -> list[dict]:
    from lorashare import SHAREModel
    from lorashare.compression import reconstruct_adapter_weights

    rows = []
    for subset in subsets:
        paths = {n: str(SHARED / "adapters" / n) for n in subset if n in adapters}
        if len(paths) < 2:
            continue
        for k in ks:
            try:
                share = SHAREModel.from_adapters(paths, num_components=k)
            except ValueError as e:  # lorashare's own refusal, e.g. ranks or targets differ
                print(f"lorashare k={k} on {list(paths)}: {e}", flush=True)
                continue
            basis = 2 * sum(t.numel() for t in share.components.values())
            for name in paths:
                loadings = share.all_loadings[name]
                weights = reconstruct_adapter_weights(share.components, loadings)
                source = adapters[name]
                deltas = {}
                for mname, m in source.modules.items():
                    a = weights[f"base_model.model.{mname}.lora_A.weight"].float()
                    b = weights[f"base_model.model.{mname}.lora_B.weight"].float()
                    deltas[mname] = m.scale * (b @ a)
                marginal = 2 * sum(t.numel() for t in loadings.values())
                r = probes[name].measure(deltas)
                rows.append(row(name, f"lorashare k={k}", marginal, basis / len(paths), source, r.headline, None))
    return rows


def thinned(front: list, fp16: int, max_ratio: float, points: int) -> list:
    """The SVD front up to ``max_ratio`` of the fp16 bytes, thinned to what the tables and the plot need (each
    point costs a pass of the base over the held-out lines): every one-rank-for-all point, the most bytes within
    each budget of :data:`BUDGETS` (the least ΔW error there), and up to ``points`` more spread evenly over log
    bytes. ``points`` < 0 keeps the whole front."""
    front = [t for t in front if t.bytes <= max_ratio * fp16]
    if points < 0 or not front:
        return front
    keep = {i for i, t in enumerate(front) if not t.ranks}
    for b in BUDGETS:
        within = [i for i, t in enumerate(front) if t.bytes <= b * fp16]
        keep |= {within[-1]} if within else set()
    lo, hi = math.log(front[0].bytes), math.log(front[-1].bytes)
    for j in range(points):
        target = lo + (hi - lo) * j / max(points - 1, 1)
        keep.add(min(range(len(front)), key=lambda i: abs(math.log(front[i].bytes) - target)))
    return [front[i] for i in sorted(keep)]


def measured(probe: Probe, modules: dict) -> float | None:
    return probe.measure({n: m.delta_weight() for n, m in modules.items()}).headline


def pack_rows(adapters: dict, probes: dict, base: Base, texts: list[str], fit: FitSettings, steps: int) -> list[dict]:
    """The calibrated pack (`pack --base`): a joint weight fit of ``adapters`` at ``fit.rank``, then bank and codes
    trained in function space on all of them in turn; each adapter's trained codes sliced to r' = 1 … its rank."""
    began = time.perf_counter()
    bank, codes, run = joint_fit(list(adapters.values()), fit)
    settings = CalibrationSettings(steps=steps)
    calibrations = [Calibration(a, base, texts, settings, seed=run.seed) for a in adapters.values()]
    trained, trained_codes, report = calibrate_shared(calibrations, bank, codes, run.topk)
    took = time.perf_counter() - began
    print(f"calibrated pack of {len(adapters)} adapters: {report.steps} steps, {took:.0f} s", flush=True)
    shared, rows = trained.numel() * 4 / len(adapters), []
    for (name, source), full in zip(adapters.items(), trained_codes):
        for r in range(1, next(iter(full.values())).rank + 1):
            tensors, table = hold_bank(source, sliced(full, r), trained, run.topk)
            kept = measured(probes[name], BANK.decode(tensors, table, trained, run.topk))
            rows.append(row(name, f"calibrated pack r={r}", BANK.stored_bytes(tensors), shared, source, kept, None, took))
    return rows


def trained_lora_rows(name, source, probe, base, texts, rank: int, settings: CalibrationSettings, lr: float) -> list[dict]:
    """A rank-``rank`` LoRA trained with calibration's loss, stored as the SVD rows store their factors (balanced,
    fp16 or grouped int-N): the same bytes as the SVD row of that rank and bits."""
    began = time.perf_counter()
    factors = train_lora(base, source, rank, texts, settings, lr)
    took = time.perf_counter() - began
    rows = []
    for bits in (16, 8, 4):
        stored = {n: stored_factors(*balanced(b, a, rank)[:2], bits) for n, (b, a) in factors.items()}
        tensors, _ = hold_lowrank(source, rank, bits)
        kept = probe.measure(as_deltas(source, stored)).headline
        label = f"trained LoRA {'fp16' if bits == 16 else f'int{bits}'} r={rank}"
        rows.append(row(name, label, LOWRANK.stored_bytes(tensors), 0, source, kept, None, took))
    return rows


def row(name, method, marginal, shared, source, kept, rel_error, seconds=None) -> dict:
    fp16 = source.fp16_bytes()
    return {
        "adapter": name,
        "method": method,
        "marginal_bytes": int(marginal),
        "shared_bytes": float(shared),
        "marginal_ratio": marginal / fp16,
        "amortized_ratio": (marginal + shared) / fp16,
        "retention": kept,
        "rel_error": rel_error,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="gemma")
    ap.add_argument("--adapters", nargs="*", default=None, help="a subset of the family [default: all of it]")
    ap.add_argument("--num-vectors", "-N", type=int, default=256)
    ap.add_argument("--vector-length", "-L", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=48, help="held-out lines of examples/text/heldout.txt")
    ap.add_argument("--max-ratio", type=float, default=max(BUDGETS), help="SVD rows up to this share of fp16 bytes")
    ap.add_argument("--svd-points", type=int, default=16, help="SVD front points beyond the budgets' own (-1: all)")
    ap.add_argument("--calibrate", nargs="*", default=[], help="adapters whose bank codes are also calibrated ('all': every one)")
    ap.add_argument("--calib-ranks", default="1,2")
    ap.add_argument("--calib-steps", type=int, default=100)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--pack", action="store_true", help="rows of a calibrated pack of the adapters with an effect")
    ap.add_argument("--pack-rank", type=int, default=None, help="codes of the calibrated pack at (at most) this rank")
    ap.add_argument("--pack-steps", type=int, default=CalibrationSettings.steps)
    ap.add_argument("--trained-lora", type=int, nargs="*", default=[], help="ranks of LoRAs trained with the same loss")
    ap.add_argument("--lora-lr", type=float, default=CalibrationSettings.lr * 0.1, help="as benchmarks/causal.py")
    ap.add_argument("--lorashare", action="store_true")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--plot", default=None, help="save the frontier plot (PNG) here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    family, base_dir, subsets = FAMILIES[args.family]
    adapters = {n: load_adapter(SHARED / "adapters" / n) for n in args.adapters or family}
    calibrate_these = set(adapters) if args.calibrate == ["all"] else set(args.calibrate)
    base = Base(base_dir, next(iter(adapters.values())), device=args.device)
    held = read_texts(ROOT / "examples" / "text" / "heldout.txt")[: args.heldout]
    calib_texts = read_texts(ROOT / "examples" / "text" / "calibration.txt")
    probes = {n: Probe(base, held, a.delta_weights(), 64, cache_bytes=4 << 30) for n, a in adapters.items()}
    effective = {n: a for n, a in adapters.items() if probes[n].measure({}).headline is not None}
    rows = []

    start = time.perf_counter()
    fit = FitSettings(num_vectors=args.num_vectors, vector_length=args.vector_length, device=args.device)
    bank, codes, run = joint_fit(list(adapters.values()), fit)
    bank = bank.float()
    print(f"joint fit of {len(adapters)} adapters: {time.perf_counter() - start:.0f} s", flush=True)
    shared = bank.numel() * 4 / len(adapters)  # float32 bank, amortized over the family

    for (name, source), full in zip(adapters.items(), codes):
        probe = probes[name]
        if name not in effective:  # an adapter without effect: nothing to retain
            print(f"{name}: no effect on the base (ΔW = 0); retention undefined, skipped", flush=True)
            continue
        for t in thinned(lowrank_front(source), source.fp16_bytes(), args.max_ratio, args.svd_points):
            tensors, table = hold_lowrank(source, t.rank, t.bits, t.ranks)
            modules = LOWRANK.decode(tensors, table, None, 0)
            kept = measured(probe, modules)
            label = f"SVD {'fp16' if t.bits == 16 else f'int{t.bits}'} r{'≤' if t.ranks else '='}{t.rank}"
            rows.append(row(name, label, LOWRANK.stored_bytes(tensors), 0, source, kept, t.rel_error))
        top = next(iter(full.values())).rank
        for r in range(1, top + 1):
            tensors, table = hold_bank(source, sliced(full, r), bank, run.topk)
            modules = BANK.decode(tensors, table, bank, run.topk)
            kept = measured(probe, modules)
            rows.append(row(name, f"bank codes r={r}", BANK.stored_bytes(tensors), shared, source, kept, None))
        if name in calibrate_these:
            settings = CalibrationSettings(code_steps=args.calib_steps, samples=args.calib_samples)
            for r in (int(x) for x in args.calib_ranks.split(",")):
                began = time.perf_counter()
                vb = VectorBank(bank=bank, topk=run.topk, codes=sliced(full, r))
                trained, _ = calibrate(source, vb, base, calib_texts, settings, seed=0, freeze_bank=True)
                tensors, table = hold_bank(source, trained.codes, bank, run.topk)
                modules = BANK.decode(tensors, table, bank, run.topk)
                kept = measured(probe, modules)
                took = time.perf_counter() - began
                rows.append(row(name, f"bank codes r={r} calibrated", BANK.stored_bytes(tensors), shared, source, kept, None, took))
        for rank in args.trained_lora:
            lora = CalibrationSettings(steps=args.calib_steps, samples=args.calib_samples)  # the calibrated codes' inputs and steps
            rows += trained_lora_rows(name, source, probe, base, calib_texts, rank, lora, args.lora_lr)
        best = max((x for x in rows if x["adapter"] == name), key=lambda x: x["retention"] or -1)
        print(f"{name}: {sum(x['adapter'] == name for x in rows)} rows; best {best['method']} {best['retention']:.3f}", flush=True)
        if args.json:  # a long run that stops keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))

    if args.pack:
        fit = FitSettings(num_vectors=args.num_vectors, vector_length=args.vector_length, device=args.device, rank=args.pack_rank)
        rows += pack_rows(effective, probes, base, calib_texts, fit, args.pack_steps)
    if args.lorashare:
        rows += lorashare_rows(adapters, probes, (1, 2, 4), subsets)

    print_tables(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot, base.causal)


def family_of(method: str) -> str:
    if method.startswith("SVD"):
        return "SVD int-N/fp16"
    if method.startswith("lorashare"):
        return "lorashare"
    if method.startswith("trained LoRA"):
        return "trained LoRA"
    if method.startswith("calibrated pack"):
        return "collection (calibrated pack)"
    return "collection (calibrated codes)" if "calibrated" in method else "collection (weight-only codes)"


def print_tables(rows: list[dict]) -> None:
    print("\n| adapter | method | marginal bytes | % of fp16 (marginal) | % with shared part | retention |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        kept = "-" if x["retention"] is None else f"{x['retention']:.3f}"
        print(
            f"| {x['adapter']} | {x['method']} | {x['marginal_bytes']:,} | {x['marginal_ratio']:.2%} | "
            f"{x['amortized_ratio']:.2%} | {kept} |"
        )
    families = sorted({family_of(x["method"]) for x in rows})
    names = sorted({x["adapter"] for x in rows})
    print("\nBest retention within a budget (marginal bytes, % of each adapter's fp16), mean over the adapters measured:")
    print("| budget | " + " | ".join(families) + " |")
    print("|---|" + "---|" * len(families))
    for b in BUDGETS:
        cells = []
        for fam in families:
            best = []
            for n in names:
                within = [x["retention"] for x in rows if x["adapter"] == n and family_of(x["method"]) == fam and x["marginal_ratio"] <= b]
                within = [v for v in within if v is not None]
                if any(x["adapter"] == n and family_of(x["method"]) == fam for x in rows):
                    best.append(max(within) if within else 0.0)  # nothing fits: keeps nothing
            cells.append(f"{sum(best) / len(best):.3f} (n={len(best)})" if best else "-")
        print(f"| {b:.0%} | " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: str, base_causal: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({x["adapter"] for x in rows})
    cols = 3
    fig, axes = plt.subplots(
        (len(names) + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((len(names) + cols - 1) // cols)), squeeze=False
    )
    styles = {
        "SVD int-N/fp16": ("tab:gray", "o"),
        "collection (weight-only codes)": ("tab:blue", "s"),
        "collection (calibrated codes)": ("tab:red", "*"),
        "lorashare": ("tab:green", "^"),
        "collection (calibrated pack)": ("tab:purple", "P"),
        "trained LoRA": ("tab:orange", "D"),
    }
    for ax, name in zip(axes.flat, names):
        for fam, (color, marker) in styles.items():
            pts = sorted(
                (x["marginal_ratio"] * 100, x["retention"])
                for x in rows
                if x["adapter"] == name and family_of(x["method"]) == fam and x["retention"] is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=fam, linestyle="-" if fam.startswith("SVD") else "none", markersize=6)
        ax.set_xscale("log")
        ax.set_ylim(-0.1, 1.02)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("marginal bytes, % of the adapter at fp16 (log)")
        ax.set_ylabel("KL retention (held-out)" if base_causal else "effect retention (held-out)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
