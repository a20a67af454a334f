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


@pytest.fixture(scope="module")
def half_bases(tiny_gpt2):
    from transformers import GPT2LMHeadModel

    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        path = tiny_gpt2 / f"base-{str(dtype).split('.')[-1]}"
        GPT2LMHeadModel.from_pretrained(tiny_gpt2 / "base", dtype=dtype).save_pretrained(path)
        out[dtype] = path
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_merge_into_a_half_precision_conv1d_base_matches_peft(tiny_gpt2, half_bases, tmp_path, dtype):
    """Conv1D stores [in, out]; the attention output projection here is square, so a ΔW laid on transposed
    would still fit the shape. Checked against PEFT's merge on the same half-precision base."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = half_bases[dtype]
    merge(base, tiny_gpt2 / "lora", tmp_path / "m")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype=dtype).state_dict()
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base, dtype=dtype), str(tiny_gpt2 / "lora"))
    theirs = theirs.merge_and_unload().state_dict()
    original = GPT2LMHeadModel.from_pretrained(base, dtype=dtype).state_dict()
    square = "transformer.h.0.attn.c_proj.weight"
    assert original[square].shape[0] == original[square].shape[1]
    for key in theirs:
        assert ours[key].dtype == dtype, key
        if key.endswith(("c_attn.weight", "c_proj.weight")):
            delta = (theirs[key].float() - original[key].float()).abs().max()
            assert delta > 0.05, key  # the adapter moves the weight well beyond half-precision rounding
        # one rounding step of the stored dtype: PEFT merges in fp32 and casts, as we do
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=1e-2, atol=1e-2, msg=key)


def test_a_base_with_overlapping_tensors_is_refused_before_merging(tiny_gpt2, tmp_path):
    """merge copies raw bytes of the base's tensors: two tensors sharing bytes must be refused, not merged twice."""
    import json
    import shutil
    import struct

    from click.testing import CliRunner

    from vbcompress.cli import main

    bad = tmp_path / "base"
    shutil.copytree(tiny_gpt2 / "base", bad)
    raw = (bad / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["transformer.h.1.attn.c_proj.weight"]["data_offsets"] = header["transformer.h.0.attn.c_proj.weight"]["data_offsets"]
    text = json.dumps(header).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    result = CliRunner().invoke(main, ["merge", "--base", str(bad), "--adapter", str(tiny_gpt2 / "lora"), "-o", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "model.safetensors" in line
    assert "overlap" in line.split("model.safetensors", 1)[1], line
    assert not (tmp_path / "m").exists()
