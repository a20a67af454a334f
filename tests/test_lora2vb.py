"""lora2vb: what a user relies on — PEFT loads the output, the report is true, runs are reproducible."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from vbcompress import FitSettings, OutputSettings, load_adapter, write_peft_lora
from vbcompress.card import model_card
from vbcompress.compress import lora2vb
from vbcompress.errors import ShapeError, VBCompressError
from vbcompress.evaluate import evaluate

from .conftest import MINILM_ADAPTER, outputs_with_delta, peft_delta_weights

FAST = dict(iters=4, refine_steps=30)


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def minilm_vb(tmp_path_factory):
    out = tmp_path_factory.mktemp("vb") / "minilm-vb"
    report = lora2vb(MINILM_ADAPTER, out, FitSettings(num_vectors=256, vector_length=128))
    return out, report


def test_minilm_meets_the_error_target(minilm_vb):
    _, report = minilm_vb
    assert report.total_rel_error <= 0.23


def test_peft_loads_compact_output_on_minilm(minilm_vb, minilm):
    from peft import PeftModel

    out, _ = minilm_vb
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and config["save_only_topk_weights"] is True
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        weights = [f.get_tensor(k) for k in keys if k.endswith("_topk_weights")]
    assert "base_model.vblora_vector_bank" in keys and all(w.dtype == torch.float32 for w in weights)
    _, fresh, batch = minilm
    model = PeftModel.from_pretrained(fresh(), str(out)).eval()
    with torch.no_grad():
        theirs = model(**batch).last_hidden_state
    ours = outputs_with_delta(fresh, batch, load_adapter(out))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_output_has_a_model_card_with_the_measured_figures(minilm_vb):
    out, report = minilm_vb
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["library_name"] == "peft"
    assert "source_adapter" not in meta  # a local source: its path stays out of a publishable card
    assert f"{report.total_rel_error:.4f}" in card and f"{report.bytes.ratio:.1%}" in card
    assert f"rank {report.svd_baseline.rank}: ΔW error {report.svd_baseline.rel_error:.4f}" in card


def test_card_keeps_the_source_license_and_drops_a_local_base_path(minilm_vb):
    _, report = minilm_vb
    card = model_card(report, base_model="/home/me/models/minilm", task_type="CAUSAL_LM", source_meta={"license": "mit", "tags": ["x"]})
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "mit" and "base_model" not in meta and "x" not in meta["tags"]
    assert "AutoModelForCausalLM" in card and "/home/me/models/minilm" in card


def test_report_error_equals_error_recomputed_from_files(minilm_vb):
    out, report = minilm_vb
    on_disk = json.loads((out / "vbcompress.json").read_text())
    recomputed = evaluate(MINILM_ADAPTER, out)
    assert on_disk["total_rel_error"] == pytest.approx(recomputed.delta.total_rel_error, rel=1e-9)
    assert on_disk["bytes"]["vb"] == recomputed.sizes.cand_bytes
    assert on_disk["bytes"]["ratio"] == pytest.approx(on_disk["bytes"]["vb"] / (2 * 73_728))
    for row in recomputed.delta.modules:
        assert on_disk["modules"][row.name]["rel_error"] == pytest.approx(row.rel_error, rel=1e-9)


def test_same_seed_gives_byte_identical_output(tmp_path):
    a = lora2vb(MINILM_ADAPTER, tmp_path / "a", FitSettings(num_vectors=64, seed=3, **FAST))
    b = lora2vb(MINILM_ADAPTER, tmp_path / "b", FitSettings(num_vectors=64, seed=3, **FAST))
    assert digest(tmp_path / "a") == digest(tmp_path / "b") and a.to_json() == b.to_json()
    lora2vb(MINILM_ADAPTER, tmp_path / "c", FitSettings(num_vectors=64, seed=4, **FAST))
    assert digest(tmp_path / "c")["adapter_model.safetensors"] != digest(tmp_path / "a")["adapter_model.safetensors"]


@pytest.mark.parametrize("num_vectors, dtype", [(64, torch.uint8), (255, torch.uint8), (256, torch.int16), (300, torch.int16)])
def test_index_dtype_follows_bank_size(tmp_path, num_vectors, dtype):
    lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=num_vectors, vector_length=64, **FAST))
    with safe_open(str(tmp_path / "o" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith("_topk_indices")} == {dtype}


def test_peft_reads_the_default_bank_size_with_our_delta_weights(tmp_path):
    """N=256, the default: PEFT's layout moves to int16 indices exactly there, and PEFT must decode it as we do."""
    lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=256, vector_length=128, **FAST))
    ours = load_adapter(tmp_path / "o")
    theirs = peft_delta_weights(tmp_path / "o", ours)
    for name, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("topk", [1, 3])
def test_topk_1_and_3_load_in_peft_with_our_delta_weights(tmp_path, topk):
    report = lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=128, vector_length=64, topk=topk, **FAST))
    ours = load_adapter(tmp_path / "o")
    assert ours.vector_bank.topk == topk and report.total_rel_error < 1
    theirs = peft_delta_weights(tmp_path / "o", ours)
    for name, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[name], rtol=1e-4, atol=1e-6)


def test_more_mixed_vectors_fit_better(tmp_path):
    errors = [
        lora2vb(
            MINILM_ADAPTER, tmp_path / f"k{k}", FitSettings(num_vectors=128, vector_length=64, topk=k, iters=20, refine_steps=100)
        ).total_rel_error
        for k in (1, 2, 3)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_full_logits_layout_loads_in_peft(tmp_path):
    lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=64, **FAST), output=OutputSettings(full_logits=True))
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["save_only_topk_weights"] is False
    ours = load_adapter(tmp_path / "o")
    theirs = peft_delta_weights(tmp_path / "o", ours)
    for name, m in ours.modules.items():
        torch.testing.assert_close(m.delta_weight(), theirs[name], rtol=1e-4, atol=1e-6)


def test_module_with_all_zero_b(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(MINILM_ADAPTER, src)
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    zero = "encoder.layer.0.attention.self.query"
    tensors[f"base_model.model.{zero}.lora_B.weight"].zero_()
    save_file(tensors, src / "adapter_model.safetensors")
    report = lora2vb(src, tmp_path / "o", FitSettings(num_vectors=64, **FAST))
    assert report.zero_modules == [zero] and report.modules[zero].rel_error is None
    out = load_adapter(tmp_path / "o")
    leak = out.modules[zero].delta_weight().norm()
    typical = min(m.delta_weight().norm() for n, m in load_adapter(src).modules.items() if n != zero)
    assert leak < 0.05 * typical  # the bank must not invent an update where the LoRA had none


def test_indivisible_vector_length_names_the_module(tmp_path):
    with pytest.raises(
        ShapeError, match=r"module encoder\.layer\.0\.attention\.self\.query: in dimension 384 is not divisible by vector length 100"
    ):
        lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(vector_length=100))
    assert not (tmp_path / "o").exists()


def test_auto_vector_length_for_odd_dimensions(tmp_path):
    adapter = load_adapter(MINILM_ADAPTER)
    for m in adapter.modules.values():  # 384 → 48: only 16 divides it
        m.A, m.B = m.A[:, :48].contiguous(), m.B[:48].contiguous()
    write_peft_lora(adapter, tmp_path / "small")
    report = lora2vb(tmp_path / "small", tmp_path / "o", FitSettings(num_vectors=32, **FAST))
    assert report.fit.vector_length == 16


def test_inputs_untouched_and_existing_output_protected(tmp_path):
    before = digest(MINILM_ADAPTER)
    lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=32, **FAST))
    assert digest(MINILM_ADAPTER) == before
    with pytest.raises(VBCompressError, match="use overwrite to replace it"):
        lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=32, **FAST))
    src = tmp_path / "copy"
    shutil.copytree(MINILM_ADAPTER, src)
    with pytest.raises(VBCompressError, match="overwrite the input"):
        lora2vb(src, src, FitSettings(num_vectors=32, **FAST), overwrite=True)


def test_rank_option_keeps_top_directions(tmp_path):
    full = lora2vb(MINILM_ADAPTER, tmp_path / "r8", FitSettings(num_vectors=64, **FAST))
    low = lora2vb(MINILM_ADAPTER, tmp_path / "r2", FitSettings(num_vectors=64, rank=2, **FAST))
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    assert low.bytes.codes == full.bytes.codes // 4
