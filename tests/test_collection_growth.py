"""A grown bank: an adapter whose directions the bank lacks brings its own vectors, appended to the bank, when
codes plus vectors cost less than plain factors. Nothing already in the collection changes, the growth is
recorded, and what is written loads in PEFT with the error the collection states."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vbcompress import FitSettings, OutputSettings, QualitySettings, load_adapter, write_peft_lora
from vbcompress.collection import Collection, add, pack, remove
from vbcompress.errors import FormatError
from vbcompress.metrics import delta_errors

from .conftest import MINILM_ADAPTER

FAST = FitSettings(num_vectors=64, vector_length=128, iters=4, refine_steps=30, code_refine_steps=10)
N = FAST.num_vectors


def patterned(root, seed: int):
    """A MiniLM adapter of rank 1 whose every sub-vector is one of four 128-long patterns (two for A's rows,
    two for B's columns) that the MiniLM bank has never seen: a few new vectors hold it exactly, while plain
    factors still pay for every value."""
    adapter = load_adapter(MINILM_ADAPTER)
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.normalize(torch.randn(4, 128, generator=gen), dim=1) * 0.05
    for m in adapter.modules.values():
        m.A, m.B = torch.zeros_like(m.A), torch.zeros_like(m.B)
        m.A[0] = patterns[torch.randint(2, (m.in_features // 128,), generator=gen)].reshape(-1)
        m.B[:, 0] = patterns[2 + torch.randint(2, (m.out_features // 128,), generator=gen)].reshape(-1) / m.scale
    write_peft_lora(adapter, root / f"patterned-{seed}")
    return root / f"patterned-{seed}"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    out = root / "c"
    # the MiniLM adapter held as bank codes, whatever they keep: the grown bank must leave them as they are
    pack([MINILM_ADAPTER], out, FAST, output=OutputSettings(bank_dtype="float16"), quality=QualitySettings(hold="bank", max_error=1.0))
    return out


@pytest.fixture
def coll(packed, tmp_path):
    shutil.copytree(packed, tmp_path / "c")
    return tmp_path / "c"


def test_an_adapter_made_of_vectors_the_bank_lacks_grows_it_for_fewer_bytes_than_factors(coll, tmp_path, minilm):
    from peft import PeftModel

    from .conftest import outputs_with_delta

    before = Collection(coll)
    old_bank, old_name = before.bank.clone(), before.names[0]
    old_codes = (coll / "adapters" / old_name / "codes.safetensors").read_bytes()
    old_delta = before.adapter(old_name).delta_weights()
    source = patterned(tmp_path, 1)

    (entry,) = add(coll, [source], fit=FAST, quality=QualitySettings(max_error=0.2)).added
    grown = Collection(coll)
    start, stop = entry.bank_rows
    assert start == N and stop > N and grown.bank.shape[0] == stop
    assert entry.held_as == f"bank codes r=1 + {stop - N} vectors" and entry.vectors_bytes == (stop - N) * 128 * 2
    # the cheapest that met: fewer bytes (codes and vectors together) than any plain factors that met
    plain = [t["bytes"] for t in entry.tried if t["codec"] == "lowrank" and t["met"]]
    assert plain and entry.marginal_bytes == entry.codes_bytes + entry.vectors_bytes < min(plain)
    # append-only: the bank's own rows, the other adapter's codes and what they decode to are untouched
    assert torch.equal(grown.bank[:N], old_bank)
    assert (coll / "adapters" / old_name / "codes.safetensors").read_bytes() == old_codes
    for name, delta in grown.adapter(old_name).delta_weights().items():
        assert torch.equal(delta, old_delta[name])
    # a new bank file, named by the manifest (format 2), the old one gone
    manifest = json.loads((coll / "collection.json").read_text())
    assert manifest["format_version"] == 2 and (coll / manifest["bank_file"]).is_file()
    assert sorted(p.name for p in coll.glob("bank*")) == [manifest["bank_file"]]

    # what a user gets back, measured apart from the manifest, loads in PEFT as VB-LoRA
    report = grown.unpack([entry.name], tmp_path / "u")
    measured = delta_errors(load_adapter(source), load_adapter(report.paths[0])).total_rel_error
    assert measured <= 0.2 and entry.rel_error == pytest.approx(measured, abs=1e-4)
    _, fresh, batch = minilm
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(fresh(), str(report.paths[0])).eval()(**batch).last_hidden_state
    torch.testing.assert_close(theirs, outputs_with_delta(fresh, batch, grown.adapter(entry.name)), rtol=1e-4, atol=1e-5)
    model = grown.load_peft(fresh(), [old_name, entry.name])  # both adapters on the one grown bank
    assert model.base_model.vblora_vector_bank[old_name].shape[0] == stop


def test_no_growth_when_told_not_to_and_vectors_outlive_the_adapter_that_brought_them(coll, tmp_path):
    source = patterned(tmp_path, 1)
    (entry,) = add(coll, [source], fit=FAST, quality=QualitySettings(max_error=0.2, grow=0)).added
    assert entry.codec == "lowrank" and entry.bank_rows is None and Collection(coll).bank.shape[0] == N
    assert not [t for t in entry.tried if t.get("vectors")]
    remove(coll, [entry.name])

    (entry,) = add(coll, [source], fit=FAST, quality=QualitySettings(max_error=0.2)).added
    grown = Collection(coll).bank.clone()
    remove(coll, [entry.name])
    # other adapters may come to use them: the bank only ever grows
    assert torch.equal(Collection(coll).bank, grown)


def test_adapters_grown_in_parallel_workers_each_get_their_own_rows(coll, tmp_path):
    sources = [patterned(tmp_path, seed) for seed in (1, 2)]
    report = add(coll, sources, fit=FAST, quality=QualitySettings(max_error=0.2), workers=2)
    rows = sorted(e.bank_rows for e in report.added)
    assert len(rows) == 2 and rows[0][0] == N and rows[0][1] == rows[1][0] and Collection(coll).bank.shape[0] == rows[1][1]
    for entry, source in zip(sorted(report.added, key=lambda e: e.name), sources):
        # both encoded against the 64-vector bank; the second to land had its codes moved to its new rows
        measured = delta_errors(load_adapter(source), Collection(coll).adapter(entry.name)).total_rel_error
        assert measured <= 0.2 and entry.rel_error == pytest.approx(measured, abs=1e-4)


def test_a_failed_growth_leaves_the_collection_as_it_was(coll, tmp_path, monkeypatch):
    from vbcompress.collection import batch

    manifest = (coll / "collection.json").read_bytes()
    files = sorted(p.name for p in coll.iterdir() if p.name != ".lock")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch, "write_manifest", full_disk)
    result = add(coll, [patterned(tmp_path, 1)], fit=FAST, quality=QualitySettings(max_error=0.2), keep_going=True)
    assert result.failed and "No space left" in result.failed[0].error
    assert (coll / "collection.json").read_bytes() == manifest
    assert sorted(p.name for p in coll.iterdir() if p.name != ".lock") == sorted([*files, "failures.json"])
    assert Collection(coll).bank.shape[0] == N


def test_a_killed_growth_leaves_a_bank_file_the_next_writer_removes(coll, tmp_path):
    stray = coll / "bank-0123456789abcdef.safetensors"  # what a kill between the bank and the manifest leaves
    shutil.copy(coll / "bank.safetensors", stray)
    keep = coll / "bank-notes.txt"  # not a name of ours: never touched
    keep.write_text("mine")
    (entry,) = add(coll, [patterned(tmp_path, 2)], fit=FAST, quality=QualitySettings(max_error=0.2, grow=0)).added
    assert not stray.exists() and keep.read_text() == "mine" and entry.bank_rows is None


def test_bank_rows_outside_the_bank_are_refused_in_one_line(coll, tmp_path):
    (entry,) = add(coll, [patterned(tmp_path, 1)], fit=FAST, quality=QualitySettings(max_error=0.2)).added
    path = coll / "collection.json"
    data = json.loads(path.read_text())
    data["adapters"][entry.name]["bank_rows"] = [N, 10_000]
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"collection.json.*bank_rows.*inside the bank") as e:
        Collection(coll)
    assert "\n" not in str(e.value)


def test_cli_says_what_an_adapter_brought_and_refuses_a_negative_growth(coll, tmp_path):
    from click.testing import CliRunner

    from vbcompress.cli import main

    source = str(patterned(tmp_path, 1))
    refused = CliRunner().invoke(main, ["add", str(coll), source, "--grow", "-1"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "--grow" in refused.stderr
    added = CliRunner().invoke(main, ["add", str(coll), source, "--max-error", "0.2", "--code-refine-steps", "10"])
    assert added.exit_code == 0, added.output
    shown = CliRunner().invoke(main, ["inspect", str(coll)]).stdout
    assert "bank codes r=1 + " in shown and " vectors" in shown
