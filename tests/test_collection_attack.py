"""A collection is a folder people download, share and mount: its own files are input. What a user relies on
when one is hostile, tampered, half-written or shared between processes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vbcompress import FitSettings, QualitySettings
from vbcompress.cli import main
from vbcompress.collection import Collection, add, pack, remove
from vbcompress.collection.store import sha256_of
from vbcompress.errors import FormatError, OutputError, SettingError, VBCompressError

from .conftest import ADAPTERS, MINILM_ADAPTER

FAST = FitSettings(num_vectors=64, vector_length=128, iters=2, refine_steps=5, code_refine_steps=5)
BANK_ONLY = QualitySettings(hold="bank", max_error=1.0)
CONTRACT = ADAPTERS / "minilm-l6-contract-r4"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "c"
    pack([MINILM_ADAPTER, CONTRACT], out, FAST, names=["real", "contract"], quality=BANK_ONLY)
    return out


@pytest.fixture
def coll(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "c")
    return tmp_path / "c"


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def edit_manifest(root, change):
    data = json.loads((root / "collection.json").read_text())
    change(data)
    (root / "collection.json").write_text(json.dumps(data))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("hostile", ["../../escaped", "/tmp/absolute-escape", "a/b", "..", "ok\nname", ""])
def test_a_manifest_naming_a_path_is_refused_and_nothing_is_written_outside(coll, tmp_path, hostile):
    def rename(data):
        data["adapters"][hostile] = {**data["adapters"].pop("real"), "name": hostile}

    edit_manifest(coll, rename)
    before = files_under(tmp_path)
    result = cli("unpack", coll, "contract", "-o", tmp_path / "u")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "not a valid adapter name" in result.stderr
    assert files_under(tmp_path) == before


def test_an_entry_whose_name_differs_from_its_key_is_refused(coll):
    edit_manifest(coll, lambda d: d["adapters"]["real"].update(name="contract"))
    with pytest.raises(FormatError, match="'name' must be the entry's key"):
        Collection(coll)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rel_error", "high", "'rel_error' must be a number"),
        ("name", None, "'name' must be a string"),
        ("rank", -4, r"'rank' must be an integer in \[1"),
        ("codec", "zip", "'codec' must be one of"),
        ("source_sha256", "not-a-hash", "'source_sha256' must be a string matching"),
    ],
)
def test_wrong_types_in_a_manifest_entry_are_one_line_errors(coll, field, value, match):
    edit_manifest(coll, lambda d: d["adapters"]["real"].update({field: value}))
    with pytest.raises(FormatError, match=match):
        Collection(coll)
    result = cli("inspect", coll)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_settings_out_of_range_are_refused(coll):
    edit_manifest(coll, lambda d: d["settings"].update(topk=-3))
    with pytest.raises(FormatError, match=r"'topk' must be an integer in \[1, 64\]"):
        Collection(coll)


def test_json_nested_too_deep_or_too_large_is_a_format_error(coll, tmp_path):
    (coll / "collection.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FormatError, match="nested too deeply"):
        Collection(coll)
    plain = tmp_path / "plain"
    shutil.copytree(MINILM_ADAPTER, plain)
    (plain / "adapter_config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    result = cli("inspect", plain)
    assert result.exit_code == 2 and "nested too deeply" in result.stderr and result.stderr.count("\n") == 1


def test_an_adapter_table_that_is_a_fifo_or_a_device_is_refused_without_reading(coll):
    table = coll / "adapters" / "real" / "adapter.json"
    table.unlink()
    os.mkfifo(table)
    with pytest.raises(FormatError, match="not a regular file|hash differs"):
        Collection(coll).adapter("real")  # returns at once: a FIFO is never opened
    table.unlink()
    table.symlink_to("/dev/zero")
    with pytest.raises(FormatError):
        Collection(coll).adapter("real")


def tamper_codes(coll, change, rehash=True):
    path = coll / "adapters" / "real" / "codes.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    if rehash:
        edit_manifest(coll, lambda d: d["adapters"]["real"].update(codes_sha256=sha256_of(path)))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t["weights"].__setitem__((0, 0), float("nan")), "finite"),
        (lambda t: t["weights"].__setitem__((0, 0), -0.5), "non-negative"),
        (lambda t: t["weights"].__setitem__((0, 0), 0.9) or t["weights"].__setitem__((0,), 1.5), "at most 1"),
        (lambda t: t.__setitem__("indices", t["indices"].float()), "must be integers"),
        (lambda t: t["indices"].__setitem__((0, 0), 200), "outside the bank"),
        (lambda t: t.__setitem__("indices", t["indices"][:-1].contiguous()), "of shape"),
    ],
)
def test_tampered_codes_are_refused_even_with_a_matching_hash(coll, tmp_path, change, match):
    tamper_codes(coll, change)
    with pytest.raises(FormatError, match=match):
        Collection(coll).adapter("real")
    result = cli("unpack", coll, "real", "-o", tmp_path / "u")
    assert result.exit_code == 2 and not (tmp_path / "u").exists()


def test_codes_changed_behind_the_manifest_fail_on_the_hash(coll):
    tamper_codes(coll, lambda t: t.__setitem__("extra", torch.zeros(3)), rehash=False)
    with pytest.raises(FormatError, match="not the file this collection wrote"):
        Collection(coll).adapter("real")


def test_a_nan_bank_is_refused_even_with_a_matching_hash(coll):
    bank = load_file(coll / "bank.safetensors")["bank"]
    bank[0, 0] = float("nan")
    save_file({"bank": bank}, coll / "bank.safetensors")
    edit_manifest(coll, lambda d: d.update(bank_sha256=sha256_of(coll / "bank.safetensors")))
    with pytest.raises(FormatError, match="NaN"):
        Collection(coll).adapter("real")


def test_a_symlinked_adapters_folder_never_leads_writes_or_deletes_outside(coll, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(coll / "adapters", victim)
    (victim / "precious").mkdir()
    (victim / "precious" / "data.txt").write_text("mine")
    shutil.rmtree(coll / "adapters")
    (coll / "adapters").symlink_to(victim)
    before = files_under(victim)
    with pytest.raises(VBCompressError):
        add(coll, [ADAPTERS / "minilm-l6-contract-r4-dropout"], fit=FAST)
    with pytest.raises(VBCompressError):
        remove(coll, ["real"])
    with pytest.raises(FormatError, match="leads outside the collection"):
        Collection(coll).adapter("real")
    assert files_under(victim) == before


def test_folders_the_manifest_does_not_name_are_left_alone_and_reported(coll):
    (coll / "adapters" / "my-notes").mkdir()
    (coll / "adapters" / "my-notes" / "n.txt").write_text("mine")
    add(coll, [ADAPTERS / "minilm-l6-contract-r4-dropout"], fit=FAST)
    remove(coll, ["contract"])
    assert (coll / "adapters" / "my-notes" / "n.txt").read_text() == "mine"
    assert Collection(coll).summary().unlisted == ["my-notes"]
    assert "my-notes" in cli("inspect", coll).stdout
    with pytest.raises(OutputError, match="exists but is not part of the collection"):
        add(coll, [CONTRACT], names=["my-notes"], fit=FAST)


def test_pack_overwrite_takes_the_collections_own_lock(coll, tmp_path):
    from vbcompress.collection import locked

    with locked(coll), pytest.raises(OutputError, match="locked"):
        pack([MINILM_ADAPTER], coll, FAST, overwrite=True)
    assert Collection(coll).names == ["real", "contract"]


def test_a_replace_killed_between_its_renames_gives_the_old_collection_back(coll, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".c.old-{dead.stdout.strip()}-x"
    old.mkdir()
    os.replace(coll, old / "x")  # the moment between the two renames
    pack([MINILM_ADAPTER], coll, FAST, overwrite=True, quality=BANK_ONLY)  # the next claim restores, then replaces
    assert Collection(coll).names == ["minilm-l6-bias-st"] and not old.exists()


def test_a_name_with_a_newline_or_escape_is_refused(coll):
    for bad in ("fine\n", "esc\x1b[31m", "tab\t"):
        with pytest.raises(SettingError, match="must be 1-128 letters"):
            add(coll, [CONTRACT], names=[bad], fit=FAST)


def test_a_bad_line_in_a_list_fails_that_source_only(coll, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("x" * 5000 + "\n" + str(ADAPTERS / "minilm-l6-contract-r4-dropout") + "\n")
    result = cli("add", coll, "--from-list", listing, "--code-refine-steps", 2)
    assert result.exit_code == 2
    assert "minilm-l6-contract-r4-dropout" in Collection(coll).names
    assert "1 source(s) failed" in result.stdout


def test_a_malformed_failures_log_is_set_aside_with_a_note(coll):
    (coll / "failures.json").write_text("{not json")
    result = cli("add", coll, ADAPTERS / "minilm-l6-contract-r4-dropout", "--code-refine-steps", 2)
    assert result.exit_code == 0, result.output
    assert "set aside as failures.json.unreadable" in result.stderr
    assert (coll / "failures.json.unreadable").read_text() == "{not json"


def test_add_and_remove_write_files_with_the_modes_pack_writes(coll):
    add(coll, [ADAPTERS / "minilm-l6-contract-r4-dropout"], fit=FAST)
    remove(coll, ["contract"])
    modes = {stat.S_IMODE(p.stat().st_mode) for p in coll.rglob("*") if p.is_file() and p.name != ".lock"}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in coll.rglob("*") if p.is_dir()}
    assert len(modes) == 1 and len(dirs) == 1, (modes, dirs)


def test_paths_with_control_characters_print_on_one_line(tmp_path):
    odd = tmp_path / "new\nline\x1b[2J"
    result = cli("inspect", odd)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "\x1b" not in result.stderr


def read_or_refuse(root):
    """What a user relies on: a tampered collection reads as finite factors or fails in one line, nothing else."""
    try:
        adapter = Collection(root).adapter("real")
    except VBCompressError as e:
        assert "\n" not in str(e) and str(e)
        return
    for m in adapter.modules.values():
        assert torch.isfinite(m.A).all() and torch.isfinite(m.B).all()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=st.sampled_from(["manifest", "entry", "settings", "table"]), key=st.text(max_size=12), value=JSON_VALUES)
def test_fuzzed_manifests_and_tables_read_or_refuse_cleanly(pristine, tmp_path_factory, part, key, value):
    root = tmp_path_factory.mktemp("fuzz") / "c"
    shutil.copytree(pristine, root)
    manifest = json.loads((root / "collection.json").read_text())
    table_path = root / "adapters" / "real" / "adapter.json"
    table = json.loads(table_path.read_text())
    target = {"manifest": manifest, "entry": manifest["adapters"]["real"], "settings": manifest["settings"], "table": table}[part]
    target[key] = value
    (root / "collection.json").write_text(json.dumps(manifest))
    table_path.write_text(json.dumps(table))
    read_or_refuse(root)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzzed_codes_files_read_or_refuse_cleanly(pristine, tmp_path_factory, flips):
    root = tmp_path_factory.mktemp("fuzzcodes") / "c"
    shutil.copytree(pristine, root)
    path = root / "adapters" / "real" / "codes.safetensors"
    data = bytearray(path.read_bytes())
    for pos, value in flips:
        data[pos % len(data)] = value
    path.write_bytes(bytes(data))
    edit_manifest(root, lambda d: d["adapters"]["real"].update(codes_sha256=sha256_of(path)))  # tampered with the hash
    read_or_refuse(root)


@pytest.mark.slow
def test_pool_workers_die_with_their_driver(coll, tmp_path):
    psutil = pytest.importorskip("psutil")
    import signal
    import time

    sources = []
    for i in range(8):
        shutil.copytree(CONTRACT, tmp_path / f"s{i}")
        sources.append(str(tmp_path / f"s{i}"))
    script = (
        "import sys\nfrom vbcompress.collection import add\nfrom vbcompress import FitSettings\n"
        f"add({str(coll)!r}, {sources!r}, fit=FitSettings(code_refine_steps=2000), workers=2, keep_going=True)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        workers = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [p for p in psutil.Process(driver.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool did not start"
        time.sleep(3)  # some of the way into their work (a worker still starting up exits on its own check)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers outlived their driver: {[p.pid for p in alive]}"
    finally:
        if driver.poll() is None:
            driver.kill()
