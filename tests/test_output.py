"""Output targets: checked before any work, never destroying an input or a folder vbcompress did not write,
one writer at a time, nothing left behind. What a user relies on when they point -o somewhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from vbcompress import FitSettings, lora2vb
from vbcompress.cli import main
from vbcompress.errors import OutputError
from vbcompress.output import claim_output

from .conftest import MINILM_ADAPTER

FAST = FitSettings(num_vectors=32, vector_length=128, iters=2, refine_steps=5)
FAST_ARGS = ["-N", "32", "-L", "128", "--iters", "2", "--refine-steps", "5"]


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    shutil.copytree(MINILM_ADAPTER, tmp_path / "src")
    return tmp_path / "src"


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if the fit starts: output problems must be found before any work."""

    def fit(*args, **kwargs):
        raise AssertionError("the fit started before the output was checked")

    monkeypatch.setattr("vbcompress.bank.pipeline.fit_bank", fit)


def cli(*args, cwd=None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_output_inside_the_input_is_refused_and_the_input_untouched(src, no_fit):
    before = digest(src)
    one_line_error(cli("lora2vb", src, "-o", src / "adapter_model.safetensors", "--overwrite", *FAST_ARGS), "inside the input")
    one_line_error(cli("lora2vb", src, "-o", src / "sub", *FAST_ARGS), "inside the input")
    assert digest(src) == before


def test_output_that_contains_the_input_is_refused(src, tmp_path, no_fit):
    before = digest(tmp_path)
    one_line_error(cli("lora2vb", src, "-o", tmp_path, "--overwrite", *FAST_ARGS), "would overwrite an input")
    assert digest(tmp_path) == before


def test_overwrite_never_replaces_a_folder_vbcompress_did_not_write(src, tmp_path, no_fit):
    mine = tmp_path / "my-stuff"
    shutil.copytree(MINILM_ADAPTER, mine / "another-adapter")
    (mine / "notes.txt").write_text("do not delete")
    before = digest(mine)
    one_line_error(cli("lora2vb", src, "-o", mine, "--overwrite", *FAST_ARGS), "not a vbcompress output")
    assert digest(mine) == before


def test_dot_as_output_is_refused_cleanly_with_nothing_left(src, tmp_path, no_fit):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    one_line_error(cli("lora2vb", src, "-o", ".", "--overwrite", *FAST_ARGS, cwd=work), "not a vbcompress output")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]


def test_existing_output_and_a_file_as_parent_fail_before_any_work(src, tmp_path, no_fit):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = cli("lora2vb", src, "-o", tmp_path / "taken", *FAST_ARGS)
    one_line_error(result, "not a vbcompress output", "choose another folder")
    assert "--overwrite" not in result.stderr  # it would not help: the hint is given only where it works
    (tmp_path / "file").write_text("x")
    one_line_error(cli("lora2vb", src, "-o", tmp_path / "file" / "out", *FAST_ARGS), "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions cannot be tested as root")
def test_unwritable_parent_fails_before_any_work(src, tmp_path, no_fit):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_error(cli("lora2vb", src, "-o", locked / "out", *FAST_ARGS), "permission denied")
    finally:
        locked.chmod(0o755)


def test_a_second_writer_of_the_same_output_gets_a_clear_error(src, tmp_path, no_fit):
    with claim_output(tmp_path / "out"):
        with pytest.raises(OutputError, match="another vbcompress process is writing this output"):
            lora2vb(src, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_earlier_output_and_leaves_no_debris(src, tmp_path):
    lora2vb(src, tmp_path / "out", FAST)
    stale = tmp_path / ".out.tmp-999999999-abc"  # what a killed run (pid long gone) left
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    lora2vb(src, tmp_path / "out", FitSettings(num_vectors=16, vector_length=128, iters=1, refine_steps=2), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert json.loads((tmp_path / "out" / "vbcompress.json").read_text())["settings"]["num_vectors"] == 16


def test_every_command_output_can_be_overwritten_by_the_same_command(src, tmp_path):
    """Each command marks its output as its own (vbcompress.json), so re-running it with --overwrite works."""
    for args in (["vb2lora", src, "-o", tmp_path / "d"], ["pack", src, "-o", tmp_path / "c", *FAST_ARGS]):
        assert cli(*args).exit_code == 0
        again = cli(*args, "--overwrite")
        assert again.exit_code == 0, again.output


@pytest.mark.slow
def test_sigterm_during_a_run_leaves_nothing_behind(src, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # a run of seconds, all of its steps (--tol 0): a shorter one can finish before the signal on a fast machine
    fit = ["-N", "256", "--iters", "50", "--tol", "0", "--refine-steps", "5000"]
    cmd = [sys.executable, "-m", "vbcompress.cli", "lora2vb", str(src), "-o", str(tmp_path / "out"), *fit]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / ".out.lock").exists():
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_output_that_does_not_read_back_is_named_not_the_temp_folder(src, tmp_path, monkeypatch):
    import vbcompress.compress as compress

    real = compress.write_vblora

    def broken_writer(adapter, out, full_logits=False):
        real(adapter, out, full_logits)
        (out / "adapter_config.json").write_text("{oops")

    monkeypatch.setattr(compress, "write_vblora", broken_writer)
    with pytest.raises(OutputError) as error:
        lora2vb(src, tmp_path / "out", FAST)
    assert str(error.value).startswith(f"{tmp_path / 'out'}: the output did not read back") and ".tmp-" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("command", ["lora2vb", "resize", "pack"])
def test_overwrite_never_replaces_a_plain_peft_adapter(src, tmp_path, no_fit, command):
    """Someone's PEFT adapter (adapter_config.json at the top, no vbcompress.json) is never an output to replace."""
    theirs = tmp_path / "their-adapter"
    shutil.copytree(MINILM_ADAPTER, theirs)
    before = digest(theirs)
    args = {"lora2vb": FAST_ARGS, "resize": ["--rank", "2"], "pack": FAST_ARGS}[command]
    one_line_error(cli(command, src, "-o", theirs, "--overwrite", *args), "not a vbcompress output", str(theirs.name))
    assert digest(theirs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "their-adapter"]
