"""kohya-ss LoRA: ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, one file.

Names are kohya's underscore form of a module path: ``lora_unet_`` + the UNet path, ``lora_te_`` (SD 1.x) or
``lora_te1_``/``lora_te2_`` (SDXL) + the text encoder's, dots written as underscores. Writing one is a
rename; reading one back into dotted paths undoes the underscores that were dots, which needs the
vocabulary of diffusers' UNet and CLIP module names (:data:`COMPOUNDS`), as diffusers' own converter does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapter import CONV, LINEAR, Adapter
from ..errors import FormatError, ShapeError, VBCompressError, listed
from ..files import check_safetensors, save_tensors
from ..version import __version__
from .common import Format, Found, build_modules, dtype_name, match_keys, reject_unknown, stored_alpha_scale, stored_factors

RULES = [
    (re.compile(r"^(?P<name>lora_[a-z0-9]+_.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<name>lora_[a-z0-9]+_.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<name>lora_[a-z0-9]+_.+)\.alpha$"), "alpha"),
]
# kohya prefix ↔ the diffusers component a module belongs to
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# Top-level module names of diffusers' UNet2DConditionModel and of CLIP's text model: a module path without
# a component prefix is placed by its first part.
UNET_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
    "conv_norm_out",
    "encoder_hid_proj",
)
TEXT_ROOTS = ("text_model", "text_projection")
# Names with an underscore of their own, in diffusers' UNet and CLIP (longest first, so `to_out` is not cut
# inside `proj_out`): every other underscore in a kohya name was a dot.
COMPOUNDS = sorted(
    "down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out time_emb_proj conv_in "
    "conv_out conv_shortcut conv_norm_out time_embedding linear_1 linear_2 add_embedding encoder_hid_proj text_model "
    "self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 final_layer_norm text_projection token_embedding "
    "position_embedding".split(),
    key=len,
    reverse=True,
)
# kohya's SDXL LoRAs name sgm (LDM) blocks, which have no one-to-one dotted diffusers path without the model.
SGM_PARTS = ("input_blocks", "output_blocks", "middle_block")


def detect(keys: list[str]) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def read(found: Found) -> Adapter:
    return read_kohya(found.tensors, found.metadata, found.weights)


def read_kohya(tensors: dict[str, torch.Tensor], metadata: dict, path: Path) -> Adapter:
    """Build an :class:`Adapter` from a kohya state dict; any key that is not down/up/alpha is an error."""
    pairs, unknown = match_keys(tensors, RULES, path=path)
    reject_unknown(path, unknown, "kohya")
    if not pairs:
        raise FormatError(path, "no lora_down/lora_up tensors found")
    modules = build_modules(pairs, path, stored_alpha_scale)
    return Adapter(
        modules=modules,
        source_format="kohya",
        base_model=metadata.get("ss_sd_model_name") or metadata.get("ss_base_model_version"),
        dtype=dtype_name(tensors),
        config={"metadata": metadata},
        source=str(path),
    )


def component_of(name: str) -> tuple[str | None, str]:
    """``(component, path inside it)`` of a module name in any of our spellings, or ``(None, name)`` when
    it names no UNet or text-encoder module."""
    for prefix, component in PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix) :]  # still underscored
    for component in ("unet", "text_encoder_2", "text_encoder"):
        if name.startswith(component + "."):
            return component, name[len(component) + 1 :]
    root = name.split(".", 1)[0]
    if root in UNET_ROOTS:
        return "unet", name
    if root in TEXT_ROOTS:
        return "text_encoder", name
    return None, name


def kohya_name(name: str, sdxl: bool = False) -> str | None:
    """The kohya name of a module (dotted path, diffusers-prefixed or already kohya), or None."""
    if name.startswith(tuple(PREFIXES)):
        return name
    component, path = component_of(name)
    if component is None:
        return None
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + path.replace(".", "_")


def dotted_name(name: str) -> tuple[str, str] | None:
    """``(component, dotted path inside it)`` of a module name in any of our spellings; component is ""
    for a path of no known component (kept as it is). None for a kohya name that cannot be spelled with
    dots: an sgm/LDM block name, which maps to diffusers blocks only with the model's configuration."""
    component, rest = component_of(name)
    if not name.startswith(tuple(PREFIXES)):
        return (component or "", rest)
    if any(part in rest for part in SGM_PARTS):
        return None
    out = rest
    for i, word in enumerate(COMPOUNDS):
        out = re.sub(rf"(?<![a-z0-9]){word}(?![a-z])", f"\0{i}\0", out)
    out = out.replace("_", ".")
    out = re.sub(r"\x00(\d+)\x00", lambda m: COMPOUNDS[int(m.group(1))], out)
    return component, out


def write_kohya(adapter: Adapter, file: Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
    """Write ``adapter``'s modules as one kohya ``.safetensors`` file: down/up factors and an ``alpha`` per
    module equal to ``scale · r`` (so kohya's ``alpha / r`` is the module's scale)."""
    sdxl = any(component_of(n)[0] == "text_encoder_2" for n in adapter.modules)
    names = {n: kohya_name(n, sdxl) for n in adapter.modules}
    unnamed = [n for n, k in names.items() if k is None]
    if unnamed:
        raise ShapeError(adapter.source, f"kohya names only UNet and text-encoder modules; these have no kohya name: {listed(unnamed)}")
    tensors = {}
    for name, m in adapter.modules.items():
        if m.kind not in (LINEAR, CONV):
            raise ShapeError(adapter.source, f"module {name}: kohya files hold linear and conv LoRA, not {m.kind}")
        key = names[name]
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = stored_factors(m, dtype)
        tensors[f"{key}.alpha"] = torch.tensor(m.scale * m.r, dtype=torch.float32)
    ranks = [m.r for m in adapter.modules.values()]
    meta = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_") and isinstance(v, str)}
    meta.update(
        ss_network_module="networks.lora",
        ss_network_dim=str(max(set(ranks), key=ranks.count)),
        ss_network_alpha=str(max(set(ranks), key=ranks.count)),  # our factors carry their scale: alpha = dim
        vbcompress_version=__version__,
    )
    save_tensors(tensors, file, metadata=meta)


def written_by_vbcompress(path: Path) -> bool:
    """Whether the file at ``path`` is a kohya file vbcompress wrote (its header carries our version)."""
    try:
        return "vbcompress_version" in check_safetensors(path).get("__metadata__", {})
    except VBCompressError:
        return False


def write(adapter: Adapter, out: Path, dtype: torch.dtype | None = None, name: str | None = None) -> Path:
    """One ``OUT/<name or OUT's name>.safetensors``, as ComfyUI and A1111 load it."""
    file = out / f"{name or out.name}.safetensors"
    write_kohya(adapter, file, dtype, metadata=adapter.config.get("metadata"))
    return file


FORMAT = Format("kohya", detect, read, write)
