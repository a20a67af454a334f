"""Merging into GPT-2's Conv1D layers (weights stored [in, out], `fan_in_fan_out`), checked against PEFT's own
`merge_and_unload` on a tiny GPT-2 built from a config: a user merging a GPT-2 LoRA relies on this layout."""

from __future__ import annotations

import pytest
import torch

from vbcompress import FitSettings, lora2vb, merge


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=97)
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(root / "base"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False),
    )
    model.save_pretrained(root / "lora")
    return root


def merged_by_peft(base, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(adapter))
    return model.merge_and_unload().state_dict()


def merged_by_us(base, adapter, out) -> dict[str, torch.Tensor]:
    from transformers import GPT2LMHeadModel

    merge(base, adapter, out)
    return GPT2LMHeadModel.from_pretrained(out).state_dict()


def assert_same_weights(ours, theirs):
    adapted = [k for k in theirs if k.endswith(("c_attn.weight", "c_proj.weight"))]
    assert len(adapted) == 6  # 2 layers × (attn.c_attn, attn.c_proj, mlp.c_proj)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lora_merge_into_conv1d_matches_peft(tiny_gpt2, tmp_path):
    base, lora = tiny_gpt2 / "base", tiny_gpt2 / "lora"
    assert_same_weights(merged_by_us(base, lora, tmp_path / "m"), merged_by_peft(base, lora))


def test_vblora_merge_into_conv1d_matches_peft(tiny_gpt2, tmp_path):
    base = tiny_gpt2 / "base"
    lora2vb(tiny_gpt2 / "lora", tmp_path / "vb", FitSettings(num_vectors=32, iters=3, refine_steps=10))
    assert_same_weights(merged_by_us(base, tmp_path / "vb", tmp_path / "m"), merged_by_peft(base, tmp_path / "vb"))
