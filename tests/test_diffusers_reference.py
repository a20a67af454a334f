"""Our diffusers, legacy attention-processor and kohya readers against diffusers' own loader
(`lora_state_dict` and its kohya converter, at state-dict level), on the corpus' SD 1.5 LoRA: people load these
files with diffusers, so its reading is the reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vbcompress import load_adapter

from .conftest import ADAPTERS

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference here (pip install -e '.[test]')")
SD_FILE = ADAPTERS / "sd15-unet-anime-diffusers" / "pytorch_lora_weights.safetensors"


def loader():
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    return StableDiffusionLoraLoaderMixin


def test_diffusers_reader_matches_diffusers_with_its_metadata_scale():
    state, alphas, meta = loader().lora_state_dict(str(SD_FILE), return_lora_metadata=True)
    assert alphas is None and meta["r"] == 4
    ours = load_adapter(SD_FILE)
    names = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    assert names == set(ours.modules)
    for name in names:
        expected = (meta["lora_alpha"] / meta["r"]) * state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
        torch.testing.assert_close(ours.modules[name].delta_weight(), expected, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    """The SD LoRA in kohya's naming with a stored alpha of 2 (scale 0.5 at r=4)."""
    adapter = load_adapter(SD_FILE)
    tensors = {}
    for name, m in adapter.modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = m.A.contiguous(), m.B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path_factory.mktemp("kohya") / "sd15_kohya.safetensors"
    save_file(tensors, path)
    return path


def diffusers_kohya_deltas(path) -> dict[str, torch.Tensor]:
    """ΔW per kohya module name as diffusers computes it: its converter's factors × network alpha / r."""
    from safetensors.torch import load_file

    state, alphas = loader().lora_state_dict(load_file(path))[:2]
    deltas = {}
    for key, down in state.items():
        if not key.endswith(".down.weight"):
            continue
        up = state[key.replace(".down.weight", ".up.weight")]
        name = key.removeprefix("unet.").removesuffix("_lora.down.weight").replace(".processor.", ".")
        deltas["lora_unet_" + name.replace(".", "_")] = alphas[key + ".alpha"] / down.shape[0] * up @ down
    return deltas


def test_kohya_reader_matches_diffusers_conversion(kohya_file):
    ours = load_adapter(kohya_file)
    assert ours.source_format == "kohya"
    theirs = diffusers_kohya_deltas(kohya_file)
    assert set(theirs) == set(ours.modules)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours.modules[name].delta_weight(), expected, rtol=1e-5, atol=1e-7)


def test_legacy_processor_reader_reads_what_diffusers_converts_to(kohya_file, tmp_path):
    """diffusers turns kohya files into the legacy attention-processor layout; our legacy reader must map
    those keys back to the same modules (`…attn1.processor.to_q_lora` → `…attn1.to_q`) with the factors
    in the right roles."""
    from safetensors.torch import load_file

    state, _ = loader().lora_state_dict(load_file(kohya_file))[:2]
    legacy = {k.removeprefix("unet."): v.contiguous() for k, v in state.items()}
    save_file(legacy, tmp_path / "legacy.safetensors")
    ours = load_adapter(tmp_path / "legacy.safetensors")
    assert ours.source_format == "diffusers-legacy"
    source = load_adapter(SD_FILE)
    assert set(ours.modules) == set(source.modules)
    for name, m in ours.modules.items():  # legacy files carry no alpha: scale 1
        torch.testing.assert_close(m.delta_weight(), source.modules[name].B @ source.modules[name].A, rtol=1e-5, atol=1e-7)


def test_legacy_to_out_processor_adapts_the_first_output_projection(tmp_path):
    """diffusers' attention processors name the output LoRA `to_out_lora`; the layer it adapts is `to_out.0`."""
    down, up = torch.randn(4, 320), torch.randn(320, 4)
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    save_file(
        {f"{block}.processor.to_out_lora.down.weight": down, f"{block}.processor.to_out_lora.up.weight": up}, tmp_path / "l.safetensors"
    )
    ours = load_adapter(tmp_path / "l.safetensors")
    assert list(ours.modules) == [f"{block}.to_out.0"]
    torch.testing.assert_close(ours.modules[f"{block}.to_out.0"].delta_weight(), up @ down)


# diffusers' converter names a text encoder's attention LoRA after the UNet's processors.
TEXT_ENCODER_NAMES = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def test_sdxl_kohya_reads_and_writes_both_text_encoders_as_diffusers_does(tmp_path):
    """SDXL kohya files adapt two text encoders (`lora_te1_`, `lora_te2_`): each module must land on its own
    encoder with diffusers' ΔW, and every output format must keep text encoder 2's modules as its own."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from safetensors.torch import load_file

    from vbcompress.formats import write_dense
    from vbcompress.formats.kohya import dotted_name

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, path, alpha in [
        ("lora_te1_", "text_model_encoder_layers_0_self_attn_q_proj", 2.0),
        ("lora_te2_", "text_model_encoder_layers_1_self_attn_v_proj", 8.0),
        ("lora_te2_", "text_model_encoder_layers_0_self_attn_k_proj", 1.0),
        ("lora_unet_", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 4.0),
    ]:
        tensors[f"{prefix}{path}.lora_down.weight"] = torch.randn(4, 64, generator=gen)
        tensors[f"{prefix}{path}.lora_up.weight"] = torch.randn(64, 4, generator=gen)
        tensors[f"{prefix}{path}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "sdxl.safetensors")

    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(load_file(tmp_path / "sdxl.safetensors"))[:2]
    theirs = {}
    for key, down in state.items():
        if key.endswith(".down.weight"):
            component, rest = key.split(".", 1)
            *path, leaf = rest.removesuffix(".down.weight").replace(".processor.", ".").split(".")
            leaf = TEXT_ENCODER_NAMES[leaf] if component.startswith("text_encoder") else leaf.removesuffix("_lora")
            up = state[key.replace(".down.weight", ".up.weight")]
            theirs[(component, ".".join([*path, leaf]))] = alphas[key + ".alpha"] / down.shape[0] * up @ down
    assert {c for c, _ in theirs} == {"text_encoder", "text_encoder_2", "unet"}

    ours = load_adapter(tmp_path / "sdxl.safetensors")
    assert {dotted_name(name) for name in ours.modules} == set(theirs)
    for name, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[dotted_name(name)], rtol=1e-5, atol=1e-6)

    for fmt in ("diffusers", "kohya"):
        written = load_adapter(write_dense(ours, tmp_path / fmt, fmt))
        placed = {dotted_name(n) if fmt == "kohya" else tuple(n.split(".", 1)): m for n, m in written.modules.items()}
        assert set(placed) == set(theirs), fmt
        for key, m in placed.items():
            torch.testing.assert_close(m.delta_weight(), theirs[key], rtol=1e-5, atol=1e-6, msg=f"{fmt} {key}")
