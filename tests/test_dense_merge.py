"""vb2lora / resize (rank rules) and the shard-by-shard merge."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from vbcompress import FitSettings, RankSettings, load_adapter, write_peft_lora
from vbcompress.adapter import LoraModule
from vbcompress.compress import lora2vb
from vbcompress.dense import to_lora
from vbcompress.errors import ShapeError
from vbcompress.merge import merge
from vbcompress.metrics import delta_errors

from .conftest import ADAPTERS, MINILM_ADAPTER, MINILM_BASE, peft_delta_weights, skeleton_model


@pytest.fixture(scope="module")
def minilm_vb(tmp_path_factory):
    out = tmp_path_factory.mktemp("vb") / "vb"
    lora2vb(MINILM_ADAPTER, out, FitSettings(num_vectors=128, vector_length=128, iters=4, refine_steps=30))
    return out


@pytest.mark.parametrize("src", ["minilm-l6-bias-st", "gpt2-tigrinya-causal", "vit-age-qv-r16"])
def test_full_rank_reproduces_delta_weight(tmp_path, src):
    report = to_lora(ADAPTERS / src, tmp_path / "o")
    errors = delta_errors(load_adapter(ADAPTERS / src), load_adapter(tmp_path / "o"))
    assert errors.total_rel_error <= 1e-5 and report.rel_error <= 1e-6
    assert load_adapter(tmp_path / "o").carried.keys() == load_adapter(ADAPTERS / src).carried.keys()


def test_vb_to_lora_at_full_rank_reproduces_the_vb_adapter(tmp_path, minilm_vb):
    to_lora(minilm_vb, tmp_path / "o")
    assert delta_errors(load_adapter(minilm_vb), load_adapter(tmp_path / "o")).total_rel_error <= 1e-5


@pytest.mark.parametrize("rank", [8, 0.9])
def test_agrees_with_peft_convert_to_lora_on_vblora(tmp_path, minilm_vb, rank):
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora.conversion import convert_to_lora

    vb = load_adapter(minilm_vb)
    config = PeftConfig.from_pretrained(str(minilm_vb))
    config.task_type = None
    model = PeftModel.from_pretrained(skeleton_model(vb), str(minilm_vb), config=config)
    lora_config, state = convert_to_lora(model, rank)
    # PEFT's float rank is Σσ² ≥ t·Σσ²: our fro rule with X = √t.
    ours = (
        to_lora(minilm_vb, tmp_path / "o", "auto", RankSettings(rule="fro", threshold=math.sqrt(rank)))
        if isinstance(rank, float)
        else to_lora(minilm_vb, tmp_path / "o", rank=rank)
    )
    for row in ours.modules:
        a = next(v for k, v in state.items() if f"{row.name}.lora_A" in k)
        assert row.rank == a.shape[0]
        b = next(v for k, v in state.items() if f"{row.name}.lora_B" in k)
        m = load_adapter(tmp_path / "o").modules[row.name]
        torch.testing.assert_close(m.delta_weight(), b.float() @ a.float() * lora_config.lora_alpha / lora_config.r, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-l6-bias-st", "t5-small-summarizer-qv", "gemma3-270m-attn-r4"])
@pytest.mark.parametrize("rule, threshold", [("sara", 0.8), ("fro", 0.9), ("ratio", 4.0)])
def test_rank_rules_match_dense_svd_and_report_true_error(tmp_path, name, rule, threshold):
    source = load_adapter(ADAPTERS / name)
    report = to_lora(ADAPTERS / name, tmp_path / "o", "auto", RankSettings(rule=rule, threshold=threshold))
    for row in report.modules:
        s = torch.linalg.svdvals(source.modules[row.name].delta_weight().double())
        s = s[: source.modules[row.name].r]
        if rule == "sara":
            expected = int((s.cumsum(0) < threshold * s.sum() * (1 - 1e-9)).sum()) + 1
        elif rule == "fro":
            expected = int((s.square().cumsum(0) < threshold**2 * s.square().sum() * (1 - 1e-9)).sum()) + 1
        else:
            expected = int((s > s[0] / threshold).sum())
        assert row.rank == expected
    measured = delta_errors(source, load_adapter(tmp_path / "o")).total_rel_error
    assert measured == pytest.approx(report.rel_error, rel=1e-4, abs=1e-6)
    assert report.retained_fro == pytest.approx(math.sqrt(1 - measured**2), rel=1e-4)


def test_per_module_ranks_load_in_peft(tmp_path):
    to_lora(MINILM_ADAPTER, tmp_path / "o", "auto", RankSettings(rule="sara", threshold=0.7))
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["rank_pattern"]
    ours = load_adapter(tmp_path / "o")
    from .conftest import peft_delta_weights

    theirs = peft_delta_weights(tmp_path / "o", ours)
    for name, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[name], rtol=1e-4, atol=1e-6)


def test_resize_of_a_rank_2r_adapter(tmp_path):
    """LoRA-GA style checkpoints store final minus initial at rank 2r; resizing recovers rank r exactly."""
    source = load_adapter(MINILM_ADAPTER)
    for m in source.modules.values():  # rank 16 = two rank-8 blocks whose difference is the real update
        m.A, m.B = torch.cat([m.A, m.A]), torch.cat([2 * m.B, -m.B], dim=1)
    write_peft_lora(source, tmp_path / "r16")  # the writer keeps each scale (lora_alpha = scale · 16)
    assert load_adapter(tmp_path / "r16").ranks == [16]
    report = to_lora(tmp_path / "r16", tmp_path / "r8", "auto", RankSettings(rule="fro", threshold=1.0))
    assert {row.rank for row in report.modules} == {8}
    assert delta_errors(load_adapter(MINILM_ADAPTER), load_adapter(tmp_path / "r8")).total_rel_error < 1e-5


def peft_merged_state(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(MINILM_BASE), str(adapter_dir)).merge_and_unload()
    return model.state_dict()


@pytest.mark.parametrize("which", ["lora", "vb"])
def test_merge_matches_peft_merge_and_unload(tmp_path, minilm_vb, minilm, which):
    from transformers import AutoModel

    adapter = MINILM_ADAPTER if which == "lora" else minilm_vb
    merge(MINILM_BASE, adapter, tmp_path / "merged")
    expected = peft_merged_state(adapter)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        shared = set(f.keys()) & set(expected)  # the file also holds a legacy position_ids buffer
        assert {f"{name}.weight" for name in load_adapter(adapter).modules} <= shared
        for key in shared:
            torch.testing.assert_close(f.get_tensor(key), expected[key], rtol=0, atol=1e-5)
    _, _, batch = minilm
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "1_Pooling" / "config.json").is_file()
    with torch.no_grad():
        out = merged(**batch).last_hidden_state
    assert torch.isfinite(out).all()


def tiny_model(path, dtype):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    model = BertModel(config).to(dtype)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sharded_merge_equals_whole_merge(tmp_path, dtype):
    model = tiny_model(tmp_path, dtype)
    model.save_pretrained(tmp_path / "whole", max_shard_size="10GB")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    gen = torch.Generator().manual_seed(1)
    modules = {
        f"encoder.layer.{i}.{leaf}": LoraModule(
            name=f"encoder.layer.{i}.{leaf}",
            A=torch.randn(4, 64, generator=gen),
            B=torch.randn(64 if leaf.endswith(("query", "value")) else 128, 4, generator=gen) * 0.1,
            scale=2.0,
        )
        for i in range(4)
        for leaf in ("attention.self.query", "attention.self.value", "intermediate.dense")
    }
    from vbcompress.adapter import Adapter

    write_peft_lora(Adapter(modules=modules), tmp_path / "lora")
    merge(tmp_path / "whole", tmp_path / "lora", tmp_path / "m_whole")
    merge(tmp_path / "sharded", tmp_path / "lora", tmp_path / "m_sharded")
    index = json.loads((tmp_path / "m_sharded" / "model.safetensors.index.json").read_text())
    whole = {}
    with safe_open(str(tmp_path / "m_whole" / "model.safetensors"), "pt") as f:
        whole = {k: f.get_tensor(k) for k in f.keys()}
    assert set(index["weight_map"]) == set(whole)
    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "m_sharded" / shard), "pt") as f:
            t = f.get_tensor(key)
        assert t.dtype == dtype and torch.equal(t, whole[key])
    base = tiny_model(tmp_path, dtype).state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    expected = (base[key].float() + modules["encoder.layer.0.attention.self.query"].delta_weight()).to(dtype)
    assert torch.equal(whole[key], expected)


def test_unmatched_modules_are_listed_and_nothing_is_written(tmp_path):
    # 12 c_attn modules and the carried score head
    with pytest.raises(ShapeError, match=r"13 adapter tensor\(s\) do not match the base model: transformer\.h\.0\.attn\.c_attn"):
        merge(MINILM_BASE, ADAPTERS / "gpt2-seqcls-cattn", tmp_path / "o")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_merge_on_cuda_without_a_gpu_is_refused_before_any_output(tmp_path):
    from vbcompress import MergeSettings
    from vbcompress.errors import SettingError

    with pytest.raises(SettingError, match="cuda asked for, but torch sees no CUDA device"):
        merge(MINILM_BASE, MINILM_ADAPTER, tmp_path / "m", MergeSettings(device="cuda"))
    assert not (tmp_path / "m").exists()


def test_add_delta_follows_the_weight_to_its_device_and_dtype(tmp_path):
    """The GPU merge path moves each weight, not the adapter: the factors follow the weight."""
    m = load_adapter(MINILM_ADAPTER).modules
    module = next(iter(m.values()))
    w = torch.zeros(module.out_features, module.in_features, dtype=torch.float64)
    module.add_delta_(w)
    torch.testing.assert_close(w, module.delta_weight().double(), rtol=1e-6, atol=1e-7)


@pytest.fixture
def rslora(tmp_path):
    """The MiniLM adapter trained with rsLoRA: scale α/√r (16/√8 ≈ 5.7) where plain LoRA would use α/r (2)."""
    shutil.copytree(MINILM_ADAPTER, tmp_path / "rs")
    config = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    (tmp_path / "rs" / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True, "lora_alpha": 16}))
    return tmp_path / "rs"


def peft_deltas_of(folder):
    return peft_delta_weights(folder, load_adapter(folder))


def rel(got: dict, want: dict) -> float:
    num = sum(float((got[n].float() - want[n].float()).square().sum()) for n in want)
    return (num / sum(float(w.float().square().sum()) for w in want.values())) ** 0.5


def test_rslora_sources_written_back_out_keep_their_delta_in_peft(rslora, tmp_path):
    """resize, vb2lora and unpack --dense write a config PEFT reads: the rsLoRA scale is applied once, not
    twice and not dropped (each output is read by PEFT, not by us)."""
    from vbcompress import QualitySettings
    from vbcompress.collection import Collection, pack

    want = peft_deltas_of(rslora)
    assert abs(rel(load_adapter(rslora).delta_weights(), want)) < 1e-6

    to_lora(rslora, tmp_path / "resized")  # every module at its own rank: ΔW reproduced
    assert rel(peft_deltas_of(tmp_path / "resized"), want) < 1e-5

    lora2vb(rslora, tmp_path / "vb", FitSettings(num_vectors=64, vector_length=128, iters=3, refine_steps=10))
    vb_in_peft = peft_deltas_of(tmp_path / "vb")
    to_lora(tmp_path / "vb", tmp_path / "dense")
    assert rel(peft_deltas_of(tmp_path / "dense"), vb_in_peft) < 1e-5

    pack([rslora], tmp_path / "coll", quality=QualitySettings(max_error=0.05))
    coll = Collection(tmp_path / "coll")
    (name,) = coll.names
    coll.unpack([name], tmp_path / "unpacked", dense=True)
    assert rel(peft_deltas_of(tmp_path / "unpacked"), want) == pytest.approx(coll.entry(name).rel_error, abs=1e-3)
