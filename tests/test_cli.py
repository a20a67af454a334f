"""The command line: bad input gives one line naming the file, exit code 2, no traceback, no output left."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from vbcompress import __version__
from vbcompress.cli import main

from .conftest import ADAPTERS, EXAMPLE, MINILM_ADAPTER, corpus_names


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert str(fragment) in lines[0]


def test_version_and_help_on_every_command():
    assert __version__ in run("--version").output
    for command in main.commands:
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.parametrize("name", corpus_names())
def test_inspect_succeeds_on_every_corpus_adapter(name):
    result = run("inspect", ADAPTERS / name, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["num_modules"] == len(info["modules"]) > 0


def test_inspect_flags_untrained_and_broken_modules():
    whisper = json.loads(run("inspect", ADAPTERS / "whisper-small-qv", "--json").stdout)
    assert len(whisper["zero_modules"]) == 24 and all(".encoder." in n for n in whisper["zero_modules"])
    broken = run("inspect", ADAPTERS / "gemma-2b-sql-qv-fp16")
    assert broken.exit_code == 0 and "NaN/Inf" in broken.stdout and "broken" in broken.stderr
    assert len(json.loads(run("inspect", ADAPTERS / "gemma-2b-sql-qv-fp16", "--json").stdout)["nonfinite_modules"]) == 36


def test_inspect_effective_rank_matches_dense_svd():
    info = json.loads(run("inspect", MINILM_ADAPTER, "--json", "--threshold", "0.8").stdout)
    from vbcompress import load_adapter

    adapter = load_adapter(MINILM_ADAPTER)
    for row in info["modules"]:
        s = torch.linalg.svdvals(adapter.modules[row["name"]].delta_weight().double())
        expected = int((s.cumsum(0) < 0.8 * s.sum()).sum()) + 1
        assert row["effective_rank"] == expected
        assert row["top_energy"] == pytest.approx(float(s[0] ** 2 / s.square().sum()), rel=1e-6)


def test_inspect_table_on_shipped_example():
    result = run("inspect", EXAMPLE)
    assert result.exit_code == 0
    assert "modules:     36" in result.stdout and "811,008 params" in result.stdout


@pytest.fixture
def broken(tmp_path):
    """Factory for a copy of the MiniLM adapter with its weights file replaced or damaged."""

    def make(tensors=None, raw: bytes | None = None, config: str | None = None):
        d = tmp_path / "bad"
        shutil.copytree(MINILM_ADAPTER, d)
        weights = d / "adapter_model.safetensors"
        if tensors is not None:
            save_file(tensors, weights)
        if raw is not None:
            weights.write_bytes(raw)
        if config is not None:
            (d / "adapter_config.json").write_text(config)
        return d

    return make


def test_truncated_safetensors(broken):
    data = (MINILM_ADAPTER / "adapter_model.safetensors").read_bytes()
    d = broken(raw=data[: len(data) // 2])
    assert_one_line_error(run("inspect", d), "adapter_model.safetensors", "truncated")


def test_corrupt_safetensors_header(broken):
    d = broken(raw=(40).to_bytes(8, "little") + b"{not json at all, only garbage bytes!!!}" + b"\0" * 64)
    assert_one_line_error(run("inspect", d), "adapter_model.safetensors", "corrupt")


def test_missing_config(broken):
    d = broken()
    (d / "adapter_config.json").unlink()
    assert_one_line_error(run("inspect", d), "adapter_config.json", "missing")


@pytest.mark.parametrize(
    "config, problem",
    [
        ("{oops", "invalid JSON"),
        ('{"peft_type": "LORA", "r": 8, "lora_alpha": "big"}', "lora_alpha"),
        ('{"peft_type": "IA3"}', "unsupported peft_type"),
    ],
)
def test_invalid_config(broken, config, problem):
    assert_one_line_error(run("inspect", broken(config=config)), "adapter_config.json", problem)


def test_rank_mismatch(broken):
    tensors = {"base_model.model.q.lora_A.weight": torch.zeros(8, 16), "base_model.model.q.lora_B.weight": torch.zeros(16, 4)}
    assert_one_line_error(run("inspect", broken(tensors=tensors)), "rank mismatch", "module q")


def test_unknown_lora_keys_are_listed(broken):
    tensors = {
        "base_model.model.q.lora_A.weight": torch.zeros(8, 16),
        "base_model.model.q.lora_B.weight": torch.zeros(16, 8),
        "base_model.model.q.lora_C.weight": torch.zeros(3),
    }
    assert_one_line_error(run("inspect", broken(tensors=tensors)), "unknown LoRA key", "lora_C")


def test_nan_adapter_is_refused_by_commands_that_use_it(tmp_path):
    out = tmp_path / "out"
    result = run("lora2vb", ADAPTERS / "gemma-2b-sql-qv-fp16", "-o", out)
    assert_one_line_error(result, "adapter_model.safetensors", "NaN/Inf")
    assert not out.exists()
    assert_one_line_error(run("eval", ADAPTERS / "gemma-2b-sql-qv-fp16", MINILM_ADAPTER), "NaN/Inf")


def test_directory_without_adapter(tmp_path):
    assert_one_line_error(run("inspect", tmp_path), str(tmp_path), "no adapter found")
    assert_one_line_error(run("inspect", tmp_path / "nowhere"), "no such file")


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run("--debug", "inspect", tmp_path)
    assert result.exit_code != 0 and result.exception is not None
