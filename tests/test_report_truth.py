"""The figures a report states are true, measured against references that share no code with the report,
and a failure at the last moment leaves no output behind."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from vbcompress import FitSettings, load_adapter, lora2vb
from vbcompress.baselines import GROUP, quantize
from vbcompress.files import REPORT_FILE

from .conftest import MINILM_ADAPTER

FAST = FitSettings(num_vectors=64, vector_length=128, iters=4, refine_steps=30)


@pytest.fixture(scope="module")
def source():
    return load_adapter(MINILM_ADAPTER)


def dense_svd_error(adapter, rank: int) -> float:
    """ΔW error of keeping each module's top ``rank`` singular directions, from dense ΔW."""
    lost = total = 0.0
    for m in adapter.modules.values():
        s = torch.linalg.svdvals(m.delta_weight().double())
        lost += float(s[rank:].square().sum())
        total += float(s.square().sum())
    return math.sqrt(lost / total)


def test_report_bytes_are_the_tensor_bytes_in_the_written_file(tmp_path):
    report = lora2vb(MINILM_ADAPTER, tmp_path / "o", FAST)
    with safe_open(str(tmp_path / "o" / "adapter_model.safetensors"), "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    vb = sum(t.numel() * t.element_size() for k, t in on_disk.items() if "vblora" in k)
    assert report.bytes.vb == vb
    assert report.bytes.bank == on_disk["base_model.vblora_vector_bank"].numel() * 4
    assert json.loads((tmp_path / "o" / REPORT_FILE).read_text())["bytes"]["vb"] == vb


@pytest.mark.parametrize("num_vectors", [64, 512])
def test_svd_figure_is_dense_truncation_within_the_byte_budget(tmp_path, source, num_vectors):
    report = lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=num_vectors, vector_length=128, iters=2, refine_steps=5))
    budget = report.bytes.vb
    per_rank = 2 * sum(m.in_features + m.out_features for m in source.modules.values())  # fp16 factors
    rank = min(budget // per_rank, 8)
    assert report.svd_baseline.rank == rank and report.svd_baseline.bytes <= budget
    assert report.svd_baseline.rel_error == pytest.approx(dense_svd_error(source, rank), abs=2e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_baseline_is_a_real_grid_of_that_many_bits(bits):
    t = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    q = quantize(t, bits)
    flat = torch.cat([q.reshape(-1), q.new_zeros(-q.numel() % GROUP)]).reshape(-1, GROUP)
    levels = 2 ** (bits - 1) - 1
    for g, orig in zip(flat, torch.cat([t.reshape(-1), t.new_zeros(-t.numel() % GROUP)]).reshape(-1, GROUP)):
        step = float(orig.abs().max()) / levels
        assert len(torch.unique(g)) <= 2 * levels + 1
        assert float((g - orig).abs().max()) <= step / 2 * 1.01  # rounding, plus the fp16 scale
    with pytest.raises(ValueError, match="2 to 8 bits"):
        quantize(t, 16)  # a 16-bit grid under fp16 scales is not what the baseline claims


def test_rank_option_keeps_the_top_singular_directions(tmp_path, source):
    report = lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=256, vector_length=128, rank=2, iters=8, refine_steps=60))
    # A bank this size reproduces two directions almost exactly: what is left is what rank 2 cannot hold.
    assert report.total_rel_error == pytest.approx(dense_svd_error(source, 2), abs=0.01)


def test_failure_after_files_are_written_leaves_no_output(tmp_path, monkeypatch):
    import vbcompress.compress as compress

    def card_fails(*args, **kwargs):
        raise RuntimeError("injected after the adapter and report were written")

    monkeypatch.setattr(compress, "model_card", card_fails)
    with pytest.raises(RuntimeError, match="injected"):
        lora2vb(MINILM_ADAPTER, tmp_path / "o", FAST)
    assert list(tmp_path.iterdir()) == []


def test_failure_during_overwrite_leaves_the_old_output_unchanged(tmp_path, monkeypatch):
    import vbcompress.compress as compress

    lora2vb(MINILM_ADAPTER, tmp_path / "o", FAST)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}

    def card_fails(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(compress, "model_card", card_fails)
    with pytest.raises(RuntimeError):
        lora2vb(MINILM_ADAPTER, tmp_path / "o", FitSettings(num_vectors=32, vector_length=128, iters=2, refine_steps=5), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
