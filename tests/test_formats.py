"""Reading every format, writing PEFT LoRA back, and agreeing with PEFT on ΔW."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from vbcompress import load_adapter, write_peft_lora
from vbcompress.adapter import CONV
from vbcompress.errors import FormatError

from .conftest import ADAPTERS, MINILM_ADAPTER, corpus_names, manifest_lora_params, peft_delta_weights


@pytest.mark.parametrize("name", corpus_names())
def test_every_corpus_adapter_reads_with_manifest_parameter_count(name):
    adapter = load_adapter(ADAPTERS / name, allow_nonfinite=True)
    assert adapter.num_lora_params == manifest_lora_params()[name]
    assert adapter.modules and all(m.A.shape[0] == m.B.shape[1] for m in adapter.modules.values())


def test_manifest_covers_every_corpus_adapter():
    assert set(manifest_lora_params()) == set(corpus_names())


def test_heads_are_carried_not_dropped():
    adapter = load_adapter(ADAPTERS / "distilbert-imdb-seqcls")
    assert sorted(adapter.carried) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
        "base_model.model.pre_classifier.bias",
        "base_model.model.pre_classifier.weight",
    ]
    assert adapter.num_carried_params == 592_130


def test_legacy_pickle_reads_like_safetensors(tmp_path):
    bin_adapter = load_adapter(ADAPTERS / "distilbert-qkv-r16-bin")
    assert bin_adapter.source.endswith("adapter_model.bin")
    out = tmp_path / "st"
    out.mkdir()
    write_peft_lora(bin_adapter, out)
    again = load_adapter(out)
    for name, m in bin_adapter.modules.items():
        assert torch.equal(m.A, again.modules[name].A) and torch.equal(m.B, again.modules[name].B)


@pytest.mark.parametrize("name", ["minilm-l6-bias-st", "gpt2-seqcls-cattn", "vit-age-qv-r16", "whisper-small-qv"])
def test_read_write_read_gives_identical_tensors(tmp_path, name):
    first = load_adapter(ADAPTERS / name)
    write_peft_lora(first, tmp_path)
    second = load_adapter(tmp_path)
    assert list(first.modules) == list(second.modules)
    for key, m in first.modules.items():
        n = second.modules[key]
        assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B)
        assert n.scale == pytest.approx(m.scale) and n.fan_in_fan_out == m.fan_in_fan_out
    assert first.carried.keys() == second.carried.keys()
    assert all(torch.equal(first.carried[k], second.carried[k]) for k in first.carried)


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "name, changes",
    [
        ("minilm-l6-bias-st", {}),
        ("minilm-l6-bias-st", {"use_rslora": True}),
        ("minilm-l6-bias-st", {"alpha_pattern": {"value": 8}, "lora_alpha": 16}),
        ("gpt2-tigrinya-causal", {}),  # Conv1D, fan_in_fan_out
        ("t5-small-summarizer-qv", {}),
        ("gemma3-270m-attn-r4", {}),
    ],
)
def test_delta_weight_equals_peft(tmp_path, name, changes):
    src = _copy_with_config(ADAPTERS / name, tmp_path / name, **changes)
    ours = load_adapter(src)
    theirs = peft_delta_weights(src, ours)
    for key, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[key].float(), rtol=1e-5, atol=1e-6)


def test_fp16_adapter_delta_weight_equals_peft(tmp_path):
    source = load_adapter(MINILM_ADAPTER)
    write_peft_lora(source, tmp_path, dtype=torch.float16)
    ours = load_adapter(tmp_path)
    assert ours.dtype == "float16"
    theirs = peft_delta_weights(tmp_path, ours)
    for key, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[key].float(), rtol=1e-3, atol=1e-4)


def _kohya_from(adapter):
    tensors = {}
    for i, (name, m) in enumerate(adapter.modules.items()):
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = m.A.contiguous()
        tensors[f"{stem}.lora_up.weight"] = m.B.contiguous()
        if i % 2 == 0:  # half with an explicit alpha, half relying on alpha = r
            tensors[f"{stem}.alpha"] = torch.tensor(float(m.scale * m.r))
    return tensors


def test_kohya_file_gives_the_same_delta_weights(tmp_path):
    source = load_adapter(ADAPTERS / "sd15-unet-anime-diffusers")
    save_file(_kohya_from(source), tmp_path / "lora.safetensors")
    kohya = load_adapter(tmp_path / "lora.safetensors")
    assert kohya.source_format == "kohya" and len(kohya.modules) == len(source.modules)
    for name, m in source.modules.items():
        k = kohya.modules["lora_unet_" + name.replace(".", "_")]
        expected = m.delta_weight() if int(list(source.modules).index(name)) % 2 == 0 else m.delta_weight() / m.scale
        torch.testing.assert_close(k.delta_weight(), expected)


def test_kohya_conv_lora_is_reported_as_conv(tmp_path):
    tensors = {
        "lora_unet_conv_in.lora_down.weight": torch.randn(4, 8, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.randn(16, 4, 1, 1),
        "lora_unet_conv_in.alpha": torch.tensor(2.0),
    }
    save_file(tensors, tmp_path / "conv.safetensors")
    m = load_adapter(tmp_path / "conv.safetensors").modules["lora_unet_conv_in"]
    assert m.kind == CONV and m.delta_weight().shape == (16, 8, 3, 3)
    expected = 0.5 * torch.einsum(
        "or,rikl->oikl", tensors["lora_unet_conv_in.lora_up.weight"][..., 0, 0], tensors["lora_unet_conv_in.lora_down.weight"]
    )
    torch.testing.assert_close(m.delta_weight(), expected)


def test_kohya_unknown_keys_are_listed(tmp_path):
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_x.hada_w1_a": torch.zeros(2),
        },
        tmp_path / "mixed.safetensors",
    )
    with pytest.raises(FormatError, match=r"unknown kohya key\(s\): lora_unet_x.hada_w1_a"):
        load_adapter(tmp_path / "mixed.safetensors")


def test_diffusers_file_with_config_in_metadata_matches_peft_file():
    peft = load_adapter(ADAPTERS / "sd15-unet-anime-diffusers")
    diffusers = load_adapter(ADAPTERS / "sd15-unet-anime-diffusers" / "pytorch_lora_weights.safetensors")
    assert diffusers.source_format == "diffusers"
    assert list(diffusers.modules) == list(peft.modules)
    for name, m in peft.modules.items():
        torch.testing.assert_close(diffusers.modules[name].delta_weight(), m.delta_weight())


def test_diffusers_legacy_attention_processor_layout(tmp_path):
    source = load_adapter(ADAPTERS / "sd15-unet-anime-diffusers")
    tensors = {}
    for name, m in source.modules.items():
        block, proj = name.rsplit(".", 1)
        tensors[f"{block}.processor.{proj}_lora.down.weight"] = m.A.contiguous()
        tensors[f"{block}.processor.{proj}_lora.up.weight"] = m.B.contiguous()
    save_file(tensors, tmp_path / "legacy.safetensors")
    legacy = load_adapter(tmp_path / "legacy.safetensors")
    assert legacy.source_format == "diffusers-legacy"
    assert list(legacy.modules) == list(source.modules)
    for name, m in source.modules.items():  # legacy processors apply the factors at scale 1
        torch.testing.assert_close(legacy.modules[name].delta_weight(), m.delta_weight() / m.scale)


def test_peft_loads_written_lora_on_minilm_with_original_outputs(tmp_path, minilm):
    from peft import PeftModel

    _, fresh, batch = minilm
    write_peft_lora(load_adapter(MINILM_ADAPTER), tmp_path / "ours")
    outputs = []
    for path in (MINILM_ADAPTER, tmp_path / "ours"):
        model = PeftModel.from_pretrained(fresh(), str(path)).eval()
        with torch.no_grad():
            outputs.append(model(**batch).last_hidden_state)
    with torch.no_grad():
        base = fresh()(**batch).last_hidden_state
    assert (outputs[0] - base).abs().max() > 0.1  # the adapter does something measurable
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
