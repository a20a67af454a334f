"""Batch `add`: one failing source does not stop the others, a killed batch resumes, and worker processes or
Ray tasks write exactly what a serial run writes (the user's collection must not depend on how it was built)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from vbcompress import FitSettings, load_adapter, write_peft_lora
from vbcompress.collection import Collection, add, pack, read_failures
from vbcompress.errors import FormatError

from .conftest import ADAPTERS, MINILM_ADAPTER

pytestmark = pytest.mark.slow  # worker pools and Ray: the full suite only

FAST = FitSettings(num_vectors=64, vector_length=128, iters=3, refine_steps=10, code_refine_steps=10)
ENCODE = FitSettings(code_refine_steps=10)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Six adapters of the MiniLM base (perturbations of the real one) and a packed collection of the real one."""
    root = tmp_path_factory.mktemp("batch")
    paths = []
    for i in range(6):
        adapter = load_adapter(MINILM_ADAPTER)
        gen = torch.Generator().manual_seed(100 + i)
        for m in adapter.modules.values():
            m.B = m.B + 0.5 * m.B.std() * torch.randn(m.B.shape, generator=gen)
        write_peft_lora(adapter, root / f"user{i}")
        paths.append(root / f"user{i}")
    pack([MINILM_ADAPTER], root / "coll", FAST)
    return root, paths


def copy(sources, tmp_path, name="c"):
    shutil.copytree(sources[0] / "coll", tmp_path / name)
    return tmp_path / name


def codes_of(root):
    return {p.parent.name: p.read_bytes() for p in sorted((root / "adapters").glob("*/codes.safetensors"))}


def test_failures_are_recorded_and_the_batch_goes_on(sources, tmp_path):
    root = copy(sources, tmp_path)
    batch = [sources[1][0], tmp_path / "no-such-adapter", ADAPTERS / "gemma-2b-sql-qv-fp16", sources[1][1]]
    report = add(root, batch, fit=ENCODE, keep_going=True)
    assert [e.name for e in report.added] == ["user0", "user1"]
    failed = {f.source: f.error for f in report.failed}
    assert "no such file or directory" in failed[str(tmp_path / "no-such-adapter")]
    assert "NaN/Inf" in failed[str(ADAPTERS / "gemma-2b-sql-qv-fp16")]
    assert set(read_failures(root)[0]) == set(failed)
    assert Collection(root).names == ["minilm-l6-bias-st", "user0", "user1"]


def test_rerun_skips_what_landed_and_retries_failures(sources, tmp_path):
    root = copy(sources, tmp_path)
    missing = tmp_path / "late"
    report = add(root, [sources[1][0], missing], fit=ENCODE, keep_going=True)
    assert len(report.added) == 1 and len(report.failed) == 1
    shutil.copytree(sources[1][1], missing)  # the missing source appears
    again = add(root, [sources[1][0], missing], fit=ENCODE, keep_going=True)
    assert again.skipped == [str(sources[1][0])] and [e.name for e in again.added] == ["late"] and not again.failed
    assert read_failures(root)[0] == {}
    with pytest.raises(FormatError):  # without keep_going the first failure is raised
        add(root, [tmp_path / "nowhere"], fit=ENCODE)


def test_killed_batch_resumes_without_redoing_work(sources, tmp_path):
    root = copy(sources, tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("# six adapters of one base\n" + "\n".join(map(str, sources[1])) + "\n")
    cmd = [sys.executable, "-m", "vbcompress.cli", "add", str(root), "--from-list", str(listing), "--code-refine-steps", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        landed = json.loads((root / "collection.json").read_text())["adapters"]
        if len(landed) >= 3:  # the pack's adapter and at least two of the batch
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    before = Collection(root).names
    assert 3 <= len(before) < 7, "the batch should have been killed part way"
    result = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["skipped"]) == len(before) - 1 and len(report["added"]) == 7 - len(before)
    assert Collection(root).names[: len(before)] == before and len(Collection(root).names) == 7
    serial = copy(sources, tmp_path, "serial")
    add(serial, sources[1], fit=ENCODE)
    assert codes_of(root) == codes_of(serial)


def test_worker_processes_write_the_same_codes_as_a_serial_run(sources, tmp_path):
    serial, pooled = copy(sources, tmp_path, "serial"), copy(sources, tmp_path, "pooled")
    add(serial, sources[1][:4], fit=ENCODE)
    report = add(pooled, sources[1][:4], fit=ENCODE, workers=2)
    assert len(report.added) == 4
    assert codes_of(pooled) == codes_of(serial)
    assert {n: e.rel_error for n, e in Collection(pooled).entries.items()} == {
        n: e.rel_error for n, e in Collection(serial).entries.items()
    }


@pytest.mark.slow
def test_ray_tasks_write_the_same_codes_as_a_serial_run(sources, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    serial, remote = copy(sources, tmp_path, "serial"), copy(sources, tmp_path, "ray")
    add(serial, sources[1][:3], fit=ENCODE)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = add(remote, sources[1][:3] + [tmp_path / "missing"], fit=ENCODE, ray_address="local", keep_going=True)
    finally:
        ray.shutdown()
    assert len(report.added) == 3 and len(report.failed) == 1
    assert codes_of(remote) == codes_of(serial)
