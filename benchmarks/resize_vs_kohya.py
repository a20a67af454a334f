"""`vbcompress resize --rank auto` against kohya-ss sd-scripts' networks/resize_lora.py, the tool SD users run.

Same input file, same rule (kohya sv_cumulative / sv_fro / sv_ratio ↔ our sara / fro / ratio) and threshold,
kohya's --new_rank cap = the source rank: ranks chosen per module, ΔW agreement, and wall time side by side
in this process (kohya: load + resize_lora_model + save; vbcompress: to_lora end to end, reading, SVD,
writing and re-reading its output). kohya's script is imported from a checkout of sd-scripts, not vendored:
only resize_lora_model runs, so its `library` imports (training utilities) are stubbed.

Inputs: the corpus' SD 1.5 LoRA written as a kohya file (with alphas), and two PEFT LoRAs that kohya's
script also reads (lora_A/lora_B keys; it ignores PEFT's lora_alpha, scale 1, so its ΔW is compared after
dividing ours by the source's scale: the rank rules are scale-free).

Usage: git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
       python benchmarks/resize_vs_kohya.py --sd-scripts /tmp/sd-scripts [--threshold 0.9] [--rules sara fro ratio]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vbcompress import RankSettings, load_adapter, to_lora

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO.parent / "shared" / "adapters"
KOHYA_RULE = {"sara": "sv_cumulative", "fro": "sv_fro", "ratio": "sv_ratio"}


def import_kohya(sd_scripts: Path):
    """networks/resize_lora.py with its `library` package stubbed (resize_lora_model needs none of it)."""
    library = types.ModuleType("library")
    for sub in ("train_util", "model_util", "utils"):
        mod = types.ModuleType(f"library.{sub}")
        mod.setup_logging = lambda *a, **k: None
        setattr(library, sub, mod)
        sys.modules[f"library.{sub}"] = mod
    sys.modules["library"] = library
    spec = importlib.util.spec_from_file_location("kohya_resize_lora", sd_scripts / "networks" / "resize_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tqdm = lambda items, **_: items  # its per-tensor progress bar
    return module


def kohya_deltas(sd: dict, source) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Per module of ``source`` (our names): kohya's chosen rank and ΔW = up @ down · alpha / rank."""
    ranks, deltas = {}, {}
    for name in source.modules:
        for down_key, up_key, alpha_key in (
            (f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"),
            (f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight", f"base_model.model.{name}.alpha"),
        ):
            if down_key in sd:
                down, up = sd[down_key].float(), sd[up_key].float()
                r = down.shape[0]
                scale = float(sd[alpha_key]) / r if alpha_key in sd else 1.0
                ranks[name], deltas[name] = r, scale * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    return ranks, deltas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd-scripts", required=True, type=Path, help="a checkout of kohya-ss/sd-scripts")
    ap.add_argument("--threshold", type=float, default=RankSettings.threshold)
    ap.add_argument("--rules", nargs="*", default=["sara", "fro", "ratio"])
    ap.add_argument("--ratio-threshold", type=float, default=4.0, help="X for the ratio rule (σ_max / X)")
    args = ap.parse_args()
    kohya = import_kohya(args.sd_scripts)
    print(
        "| input | rule (ours ↔ kohya) | X | modules | same rank | ranks ours / kohya (mean) | max ΔW difference, same-rank modules | vbcompress | kohya resize_lora.py |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        to_lora(ADAPTERS / "sd15-unet-anime-diffusers", tmp / "sd15-kohya", to="kohya")  # full rank: the same ΔW, kohya's naming
        inputs = {
            "sd15-unet-anime-diffusers (kohya file)": tmp / "sd15-kohya" / "sd15-kohya.safetensors",
            "vit-age-qv-r16 (PEFT)": ADAPTERS / "vit-age-qv-r16" / "adapter_model.safetensors",
            "llama32-1b-qv (PEFT)": ADAPTERS / "llama32-1b-qv" / "adapter_model.safetensors",
        }
        for label, file in inputs.items():
            source = load_adapter(file.parent if file.name == "adapter_model.safetensors" else file)
            cap = max(source.ranks)
            for rule in args.rules:
                x = args.ratio_threshold if rule == "ratio" else args.threshold
                out = tmp / f"ours-{rule}"
                start = time.perf_counter()
                to_lora(
                    file.parent if file.name == "adapter_model.safetensors" else file,
                    out,
                    "auto",
                    RankSettings(rule=rule, threshold=x),
                    overwrite=True,
                )
                ours_t = time.perf_counter() - start
                start = time.perf_counter()
                sd = load_file(file)
                resized, _, _ = kohya.resize_lora_model(sd, cap, cap, torch.float32, "cpu", KOHYA_RULE[rule], x, False)
                save_file({k: v.contiguous() for k, v in resized.items()}, str(tmp / "kohya.safetensors"))
                kohya_t = time.perf_counter() - start
                k_ranks, k_deltas = kohya_deltas(resized, source)
                ours = load_adapter(out)
                same = sum(ours.modules[n].r == k_ranks[n] for n in k_ranks)
                diff = None  # over the modules where both chose the same rank: the same ΔW is expected there
                for n, kd in k_deltas.items():
                    if ours.modules[n].r != k_ranks[n]:
                        continue
                    mine = ours.modules[n].delta_weight().reshape(kd.shape)
                    if "PEFT" in label:
                        mine = mine / source.modules[n].scale  # kohya reads PEFT factors without lora_alpha
                    diff = max(diff or 0.0, float((mine - kd).norm() / kd.norm().clamp_min(1e-12)))
                mean = lambda rs: sum(rs) / len(rs)  # noqa: E731
                print(
                    f"| {label} | {rule} ↔ {KOHYA_RULE[rule]} | {x} | {len(k_ranks)} | {same}/{len(k_ranks)} | "
                    f"{mean([ours.modules[n].r for n in k_ranks]):.2f} / {mean(list(k_ranks.values())):.2f} | {'-' if diff is None else f'{diff:.1e}'} | "
                    f"{ours_t:.2f} s | {kohya_t:.2f} s ({kohya_t / ours_t:.1f}×) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
