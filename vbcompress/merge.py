"""``merge``: fold an adapter into base weights, one safetensors shard at a time.

Peak memory is about the largest tensor plus the adapter: tensors are read one at a time with plain reads
(a memory-mapped shard's pages would count as resident), merged (ΔW computed in float32, laid out as the base stores the weight), cast and appended to
the output shard one at a time.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapter import Adapter
from .card import merged_card, source_metadata
from .errors import FormatError, ShapeError, VBCompressError, listed
from .files import CAST_DTYPES, DTYPE_OF, REPORT_FILE, check_safetensors, iter_safetensors, read_json, stream_safetensors, write_json
from .formats import load_adapter
from .hub import resolve
from .output import claim_output
from .settings import MergeSettings, resolve_device

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Other serialisations of the same weights would be stale next to merged shards.
STALE = ("pytorch_model*.bin", "*.h5", "*.msgpack", "*.onnx", "*.ckpt", REPORT_FILE)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")


@dataclass
class BaseLayout:
    """A model directory's safetensors layout, every header parsed once."""

    shards: dict[str, dict]  # shard file → its parsed header
    info: dict[str, tuple[list[int], str]]  # weight name → (shape, safetensors dtype)
    indexed: bool  # sharded with model.safetensors.index.json


def base_layout(base: Path) -> BaseLayout:
    """Read the safetensors layout of a transformers/diffusers model directory (headers only)."""
    if not base.is_dir():
        raise FormatError(base, "base model must be a directory")
    if (base / INDEX).is_file():
        weight_map = read_json(base / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(base / INDEX, "no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        candidates = [p for p in (base / SINGLE, *sorted(base.glob("*.safetensors"))) if p.is_file()]
        if not candidates:
            raise FormatError(base, "no model.safetensors or model.safetensors.index.json (merge reads safetensors weights)")
        files = [candidates[0].name]
    shards, info = {}, {}
    for shard in files:
        path = base / shard
        if not path.is_file():
            raise FormatError(path, "shard named in the index is missing")
        shards[shard] = check_safetensors(path)
        for name, meta in shards[shard].items():
            if name != "__metadata__":
                info[name] = (meta["shape"], meta["dtype"])
    return BaseLayout(shards=shards, info=info, indexed=(base / INDEX).is_file())


def resolve_targets(adapter: Adapter, info: dict[str, tuple[list[int], str]], base: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Map every adapter module to the base weight it changes, and carried heads to the weights they replace.

    Tries the exact ``<module>.weight``, then a unique suffix match (adapters saved on a wrapper model),
    then kohya's underscore names. Raises one error listing every module that does not match.
    """
    by_suffix: dict[str, list[str]] = {}
    kohya: dict[str, str] = {}
    for key in info:
        stem = key.removesuffix(".weight")
        parts = stem.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(key)
        for prefix in KOHYA_PREFIXES:
            kohya[prefix + stem.replace(".", "_")] = key
    targets, problems = {}, []
    for name, m in adapter.modules.items():
        key = f"{name}.weight"
        if key not in info:
            hits = by_suffix.get(name, []) or by_suffix.get(name.split(".", 1)[-1], [])
            key = hits[0] if len(hits) == 1 else kohya.get(name)
            if key is None:
                problems.append(f"{name} (no weight)" if not hits else f"{name} (ambiguous: {', '.join(hits[:3])})")
                continue
        expected = (
            list(m.delta_weight(torch.float32).shape)
            if m.kind == "conv"
            else ([m.in_features, m.out_features] if m.transposed else [m.out_features, m.in_features])
        )
        if info[key][0] != expected:
            problems.append(f"{name} (ΔW {expected} vs {key} {info[key][0]})")
            continue
        targets[key] = name
    replaced = {}
    for key, t in adapter.carried.items():
        if "lora_magnitude_vector" in key:
            raise VBCompressError(adapter.source, "DoRA adapters are not merged by vbcompress (magnitudes need the full weight norm)")
        plain = key.removeprefix("base_model.model.")
        if plain in info and list(t.shape) == info[plain][0]:
            replaced[plain] = key
        else:
            problems.append(f"{key} (carried tensor without a base weight of shape {list(t.shape)})")
    if problems:
        raise ShapeError(base, f"{len(problems)} adapter tensor(s) do not match the base model: {listed(problems, 6, '; ')}")
    return targets, replaced


@dataclass
class MergeReport:
    """What ``merge`` wrote."""

    base: str
    adapter: str
    out: str
    shards: int
    merged_modules: int
    replaced_tensors: int
    copied_files: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def merge(
    base: str | Path,
    adapter_src: str | Path,
    out: str | Path,
    settings: MergeSettings | None = None,
    *,
    overwrite: bool = False,
    token: str | None = None,
) -> MergeReport:
    """Write ``base`` with the adapter at ``adapter_src`` folded in to ``out``.

    Either may be a Hub id (``owner/name[@revision]``); only the files a merge needs are downloaded.
    """
    settings = settings or MergeSettings()
    settings.check()
    resolve_device(settings.device)  # no GPU for --device cuda fails before any output is claimed
    base_dir = resolve(base, "base", token=token).path
    adapter_dir = resolve(adapter_src, "adapter", token=token).path
    with claim_output(out, overwrite, inputs=(base_dir, adapter_dir)) as target:
        return _merge(base, adapter_src, out, base_dir, adapter_dir, target, settings)


def _merge(base, adapter_src, out, base_dir: Path, adapter_dir: Path, target, settings: MergeSettings) -> MergeReport:
    adapter = load_adapter(adapter_dir)
    layout = base_layout(base_dir)
    targets, replaced = resolve_targets(adapter, layout.info, base_dir)
    cast = CAST_DTYPES[settings.dtype]
    device = torch.device(resolve_device(settings.device))
    total_size = 0
    # One float32 scratch for the largest merged weight: fresh memory per weight costs more than the math.
    scratch = torch.empty(max((math.prod(layout.info[k][0]) for k in targets), default=0))
    with target.write() as tmp:
        for shard, header in layout.shards.items():
            names = []
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                dtype = DTYPE_OF[meta["dtype"]]
                if cast is not None and dtype.is_floating_point:
                    dtype = cast
                names.append((key, meta["shape"], dtype))
                total_size += math.prod(meta["shape"]) * torch.empty(0, dtype=dtype).element_size()

            def merged(path=base_dir / shard, header=header):
                for key, t in iter_safetensors(path, header):
                    if key in targets:  # ΔW accumulated in float32 in a reused scratch, then back in place
                        if device.type != "cpu":
                            t.copy_(adapter.modules[targets[key]].add_delta_(t.to(device, torch.float32)))
                        elif t.dtype == torch.float32:
                            adapter.modules[targets[key]].add_delta_(t)
                        else:
                            w = scratch[: t.numel()].view(t.shape).copy_(t)
                            t.copy_(adapter.modules[targets[key]].add_delta_(w))
                    elif key in replaced:
                        t = adapter.carried[replaced[key]].to(t.dtype)
                    yield t.to(cast) if cast is not None and t.is_floating_point() else t

            stream_safetensors(tmp / shard, names, merged(), metadata=header.get("__metadata__") or {"format": "pt"})
        if layout.indexed:
            index = read_json(base_dir / INDEX)
            index.setdefault("metadata", {})["total_size"] = total_size
            write_json(tmp / INDEX, index)
        copied = copy_side_files(base_dir, tmp, set(layout.shards) | {INDEX, "README.md"})
        dtype = (
            settings.dtype
            if cast is not None
            else ", ".join(sorted({meta["dtype"] for h in layout.shards.values() for k, meta in h.items() if k != "__metadata__"}))
        )
        (tmp / "README.md").write_text(merged_card(str(base), str(adapter_src), source_metadata(base_dir), dtype))
        if cast is not None and (tmp / "config.json").is_file():
            config = json.loads((tmp / "config.json").read_text())
            config["torch_dtype"] = settings.dtype
            write_json(tmp / "config.json", config)
        report = MergeReport(
            base=str(base),
            adapter=str(adapter_src),
            out=str(out),
            shards=len(layout.shards),
            merged_modules=len(targets),
            replaced_tensors=len(replaced),
            copied_files=copied,
        )
        write_json(tmp / REPORT_FILE, report.to_json())  # also marks the folder as ours, for --overwrite
    return report


def copy_side_files(base: Path, dest: Path, skip: set[str]) -> list[str]:
    """Copy config, tokenizer and other small files (not stale weight files) from ``base`` into ``dest``."""
    copied = []
    for p in sorted(base.iterdir()):
        if p.name in skip or any(p.match(pattern) for pattern in STALE):
            continue
        if p.is_dir():
            shutil.copytree(p, dest / p.name)
        else:
            shutil.copy2(p, dest / p.name)
        copied.append(p.name)
    return copied
