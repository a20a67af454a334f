"""One verdict in every command: what an output keeps against the best plain representation in no more bytes,
computed here against an independent truncation (dense SVD of ΔW), and said first when plain keeps more."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vbcompress import load_adapter, write_peft_lora
from vbcompress.cli import main

from .conftest import ADAPTERS, MINILM_ADAPTER


def dense_svd_error(adapter, rank: int) -> float:
    """ΔW error of keeping each module's top ``rank`` singular directions, from dense ΔW (no code of ours)."""
    err = ref = 0.0
    for m in adapter.modules.values():
        s = torch.linalg.svdvals(m.delta_weight().double())
        ref += float(s.square().sum())
        err += float(s[rank:].square().sum())
    return (err / ref) ** 0.5


def lora2vb(src, out, *args):
    result = CliRunner().invoke(main, ["lora2vb", str(src), "-o", str(out), *map(str, args)])
    assert result.exit_code == 0, result.output
    as_json = CliRunner().invoke(main, ["lora2vb", str(src), "-o", str(out), "--overwrite", "--json", *map(str, args)])
    return result.stdout, json.loads(as_json.stdout)


FAST = ("--iters", 3, "--refine-steps", 20)


@pytest.mark.slow
def test_int4_factors_win_and_the_command_that_writes_them_is_named(tmp_path):
    src = ADAPTERS / "gemma3-270m-attn-r4"
    text, report = lora2vb(src, tmp_path / "o", "-N", 256, "-L", 128, *FAST)
    v = report["verdict"]
    assert v["kind"] == "plain" and v["plain"]["bits"] in (4, 8)
    # the plain figure is a real truncation: no better than dense SVD at that rank, and within int4's rounding of it
    exact = dense_svd_error(load_adapter(src), v["plain"]["rank"])
    assert exact - 1e-6 <= v["plain"]["rel_error"] <= exact + 0.05
    assert v["plain"]["bytes"] <= report["bytes"]["vb"] and v["plain"]["rel_error"] < report["total_rel_error"]
    first = text.splitlines()[1]
    assert first.startswith("warning: int") and "keep more of this adapter in fewer bytes" in first
    assert v["command"] in first and "--hold lowrank" in v["command"]
    card = (tmp_path / "o" / "README.md").read_text()
    assert "**Warning" in card.split("| What was kept |")[0]  # at the top, before the figures


def test_fp16_truncation_wins_for_a_rank_one_adapter_and_resize_is_named(tmp_path):
    adapter = load_adapter(MINILM_ADAPTER)
    for m in adapter.modules.values():
        m.A, m.B = m.A[:1].contiguous(), m.B[:, :1].contiguous()
    write_peft_lora(adapter, tmp_path / "r1")
    text, report = lora2vb(tmp_path / "r1", tmp_path / "o", "-N", 64, "-L", 128, *FAST)
    v = report["verdict"]
    assert v["kind"] == "plain" and v["plain"]["bits"] == 16 and v["plain"]["rank"] == 1
    assert v["plain"]["rel_error"] == pytest.approx(dense_svd_error(load_adapter(tmp_path / "r1"), 1), abs=1e-3)
    assert v["command"] == f"vbcompress resize {tmp_path / 'r1'} -o OUT --rank 1"
    assert "warning: fp16 factors of rank 1 keep more" in text


def test_a_bank_that_keeps_more_than_any_truncation_says_so(tmp_path):
    # rank 1, every module the same six sub-vectors: a bank of 16 holds it exactly, int4 factors only roughly
    adapter = load_adapter(MINILM_ADAPTER)
    patterns = torch.randn(6, 128, generator=torch.Generator().manual_seed(3))
    for m in adapter.modules.values():
        m.A, m.B = patterns[:3].reshape(1, 384).clone(), patterns[3:].reshape(384, 1).clone()
    write_peft_lora(adapter, tmp_path / "patterned")
    text, report = lora2vb(tmp_path / "patterned", tmp_path / "o", "-N", 16, "-L", 128, "-k", 1, "--iters", 10)
    v = report["verdict"]
    assert v["kind"] == "ours" and v["keeps"] == "much" and report["total_rel_error"] < 1e-3
    best = v["plain"]  # int4 rank 1 is all that fits in the bank's bytes, and its rounding costs
    assert best["bits"] == 4 and best["rank"] == 1 and best["bytes"] <= report["bytes"]["vb"]
    assert best["rel_error"] > report["total_rel_error"] + 0.05
    assert "verdict:   this VB-LoRA adapter keeps at least as much as any plain truncation" in text


def test_an_output_that_keeps_nothing_says_so_when_nothing_plain_fits_either(tmp_path):
    adapter = load_adapter(MINILM_ADAPTER)
    gen = torch.Generator().manual_seed(5)
    for m in adapter.modules.values():
        m.A, m.B = torch.randn(m.A.shape, generator=gen), torch.randn(m.B.shape, generator=gen)
    write_peft_lora(adapter, tmp_path / "noise")
    text, report = lora2vb(tmp_path / "noise", tmp_path / "o", "-N", 2, "-L", 128, "-k", 1, *FAST)
    v = report["verdict"]
    assert v["kind"] == "nothing" and v["keeps"] == "nothing" and v["plain"] is None
    assert "warning: this VB-LoRA adapter keeps almost nothing of the adapter" in text


@pytest.mark.slow
def test_eval_shows_the_base_alone_next_to_the_candidate(tmp_path, capsys):
    from vbcompress.cli.adapters import print_eval
    from vbcompress.evaluate import evaluate

    from .conftest import gemma_dir

    src = ADAPTERS / "gemma3-270m-attn-r4"
    lines = tmp_path / "d.txt"
    lines.write_text("The quick brown fox jumps over the lazy dog.\nA stitch in time saves nine.\n")
    report = evaluate(src, src, base=gemma_dir(), data=lines)  # one Gemma run, printed both ways
    f = report.to_json()["function"]
    assert f["top1_agreement"] == pytest.approx(1.0) and 0 <= f["base_top1_agreement"] <= 1
    print_eval(report)
    assert "(the base alone: " in capsys.readouterr().out


def test_size_first_dry_run_writes_nothing_and_its_bytes_are_what_a_fit_writes(tmp_path):
    src = ADAPTERS / "minilm-l6-bias-st"
    result = CliRunner().invoke(main, ["lora2vb", str(src), "--dry-run", "-L", "128", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["num_vectors"]: r for r in json.loads(result.stdout)["rows"]}
    assert not list(tmp_path.iterdir())
    _, report = lora2vb(src, tmp_path / "o", "-N", 64, "-L", 128, *FAST)
    assert rows[64]["bytes"] == report["bytes"]["vb"]
    assert rows[64]["plain"]["rel_error"] == pytest.approx(report["verdict"]["plain"]["rel_error"])


def test_a_byte_budget_chooses_the_largest_bank_that_fits(tmp_path):
    src = ADAPTERS / "minilm-l6-bias-st"
    _, report = lora2vb(src, tmp_path / "o", "--max-bytes", 40000, "-L", 128, *FAST)
    assert report["bytes"]["vb"] <= 40000 and report["settings"]["num_vectors"] == 64  # N=128: its bank alone is 65 KB
    tight = CliRunner().invoke(main, ["lora2vb", str(src), "-o", str(tmp_path / "t"), "--max-bytes", "100"])
    assert tight.exit_code == 2 and "--max-bytes allows 100 bytes" in tight.stderr and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_a_retention_target_picks_the_smallest_bank_that_reaches_it_or_says_it_cannot(tmp_path):
    """--min-kl-retention with --base: every N tried is reported with what it kept on held-out text; the one
    written is the smallest that met the target, or the largest (with a warning) when none did."""
    from vbcompress import CalibrationSettings, FitSettings
    from vbcompress.compress import lora2vb
    from vbcompress.settings import SizeSettings

    from .conftest import MINILM_BASE

    fit = FitSettings(vector_length=128, iters=2, refine_steps=5)
    cal = CalibrationSettings(steps=5, samples=32)
    target = SizeSettings(min_kl_retention=0.05, max_bytes=140_000)  # N up to 256: three tries at most
    easy = lora2vb(MINILM_ADAPTER, tmp_path / "easy", fit, base=MINILM_BASE, calibration=cal, size=target)
    met = [t for t in easy.search if t["met"]]
    assert met and easy.fit.num_vectors == min(t["num_vectors"] for t in met)
    assert all(t["retention"] < 0.05 for t in easy.search if t["num_vectors"] < easy.fit.num_vectors)
    written = json.loads((tmp_path / "easy" / "vbcompress.json").read_text())
    assert written["search"]["tried"] == easy.search and written["settings"]["num_vectors"] == easy.fit.num_vectors
    assert easy.calibration.retention_after.headline == next(
        t["retention"] for t in easy.search if t["num_vectors"] == easy.fit.num_vectors
    )

    result = CliRunner().invoke(
        main,
        ["lora2vb", str(MINILM_ADAPTER), "-o", str(tmp_path / "hard"), "-L", "128", "--iters", "2", "--refine-steps", "5",
         "--base", str(MINILM_BASE), "--calib-steps", "5", "--calib-samples", "32", "--min-kl-retention", "1.0", "--max-bytes", "40000"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    hard = json.loads((tmp_path / "hard" / "vbcompress.json").read_text())
    assert [t["met"] for t in hard["search"]["tried"]] == [False] and "warning: no N up to" in result.stdout
