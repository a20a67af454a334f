"""Collections: one bank for many adapters. What a user relies on: PEFT loads what `unpack` writes, the stated
errors are the errors of the files, `add` never breaks or changes what is already there, bad input is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from vbcompress import FitSettings, QualitySettings, load_adapter, write_peft_lora
from vbcompress.cli import main
from vbcompress.collection import Collection, add, locked, pack, remove
from vbcompress.errors import FormatError, OutputError, SettingError, ShapeError
from vbcompress.metrics import delta_errors

from .conftest import ADAPTERS, MINILM_ADAPTER, outputs_with_delta, peft_delta_weights

FAST = FitSettings(num_vectors=64, vector_length=128, iters=4, refine_steps=30, code_refine_steps=10)
# The tests of bank-code mechanics (PEFT layout, shared bank, add against a frozen bank) hold every adapter
# as bank codes whatever they keep; the quality floor has tests of its own (test_quality_floor.py).
BANK_ONLY = QualitySettings(hold="bank", max_error=1.0)


def digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Three adapters of the MiniLM base: the real one, a perturbed sibling, and a rank-4 cousin."""
    root = tmp_path_factory.mktemp("family")
    real = load_adapter(MINILM_ADAPTER)
    gen = torch.Generator().manual_seed(0)
    sibling = load_adapter(MINILM_ADAPTER)
    for m in sibling.modules.values():
        m.B = m.B + 0.3 * m.B.std() * torch.randn(m.B.shape, generator=gen)
    write_peft_lora(sibling, root / "sibling")
    cousin = load_adapter(MINILM_ADAPTER)
    for m in cousin.modules.values():
        m.A, m.B = m.A[:4].contiguous(), m.B[:, :4].contiguous()
    write_peft_lora(cousin, root / "cousin")
    return {"real": MINILM_ADAPTER, "sibling": root / "sibling", "cousin": root / "cousin", "_": real}


@pytest.fixture(scope="module")
def packed(tmp_path_factory, family):
    out = tmp_path_factory.mktemp("coll") / "minilm"
    pack([family["real"], family["sibling"]], out, FAST, names=["real", "sibling"], quality=BANK_ONLY)
    return Collection(out)


def fresh_copy(packed, tmp_path):
    shutil.copytree(packed.path, tmp_path / "c")
    return tmp_path / "c"


def test_stated_errors_equal_errors_of_unpacked_files(packed, family, tmp_path):
    for name in packed.names:
        path = packed.unpack([name], tmp_path / name).paths[0]
        measured = delta_errors(load_adapter(family[name]), load_adapter(path)).total_rel_error
        assert packed.entry(name).rel_error == pytest.approx(measured, abs=1e-4)
        assert measured < 1  # the shared bank keeps part of each adapter, for both of them


def test_peft_loads_an_unpacked_adapter_with_our_outputs(packed, minilm, tmp_path):
    from peft import PeftModel

    path = packed.unpack(["sibling"], tmp_path / "sibling").paths[0]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and config["save_only_topk_weights"] is True
    _, fresh, batch = minilm
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(fresh(), str(path)).eval()(**batch).last_hidden_state
    torch.testing.assert_close(theirs, outputs_with_delta(fresh, batch, load_adapter(path)), rtol=1e-4, atol=1e-5)


def test_two_adapters_in_one_peft_model_switch_and_share_one_bank(packed, minilm):
    _, fresh, batch = minilm
    model = packed.load_peft(fresh(), ["real", "sibling"]).eval()
    banks = model.base_model.vblora_vector_bank
    assert banks["real"] is banks["sibling"]
    for name in ("real", "sibling", "real"):
        model.set_adapter(name)
        with torch.no_grad():
            got = model(**batch).last_hidden_state
        torch.testing.assert_close(got, outputs_with_delta(fresh, batch, packed.adapter(name)), rtol=1e-4, atol=1e-5)


def test_add_fits_codes_only_and_changes_no_existing_file(packed, family, tmp_path):
    root = fresh_copy(packed, tmp_path)
    before = digest(root)
    (entry,) = add(root, [family["cousin"]], fit=FAST, quality=BANK_ONLY).added
    after = digest(root)
    assert {k: v for k, v in after.items() if k in before and k != "collection.json"} == {
        k: v for k, v in before.items() if k != "collection.json"
    }
    assert entry.name == "cousin" and entry.source_rank == 4 and entry.codec == "bank" and entry.added_by == "add"
    coll = Collection(root)
    assert coll.names == ["real", "sibling", "cousin"]
    assert torch.equal(coll.bank, packed.bank)
    measured = delta_errors(load_adapter(family["cousin"]), coll.adapter("cousin")).total_rel_error
    assert entry.rel_error == pytest.approx(measured, abs=1e-4) and measured < 1


def test_failed_add_leaves_the_collection_as_it_was(packed, family, tmp_path, monkeypatch):
    import vbcompress.collection.batch as batch
    import vbcompress.collection.writes as writes

    root = fresh_copy(packed, tmp_path)
    before = digest(root)
    real_save = writes.save_tensors

    def half_written(tensors, path, *args):
        real_save(dict(list(tensors.items())[:1]), path, *args)
        raise OSError("disk full (injected)")

    def content(root):  # the collection; failures.json is the log of what did not land
        return {k: v for k, v in digest(root).items() if k != "failures.json"}

    # a full disk is this adapter's failure, in one line, not a traceback
    monkeypatch.setattr(writes, "save_tensors", half_written)
    with pytest.raises(OutputError, match="cannot write adapter 'cousin' .*injected"):
        add(root, [family["cousin"]], fit=FAST)
    assert content(root) == before
    monkeypatch.undo()

    def no_manifest(*args):
        raise OSError("killed before the manifest (injected)")

    monkeypatch.setattr(batch, "write_manifest", no_manifest)
    with pytest.raises(OutputError, match="injected"):
        add(root, [family["cousin"]], fit=FAST)
    assert content(root) == before
    monkeypatch.undo()
    assert Collection(root).unpack(["real"], tmp_path / "u").paths[0].is_dir()


def test_killed_add_leaves_a_valid_collection_and_the_next_add_cleans_up(packed, family, tmp_path):
    root = fresh_copy(packed, tmp_path)
    names = Collection(root).names
    # SIGKILL at the worst moment: the new adapter's folder is in place, the manifest not yet replaced.
    script = (
        "import os, signal, sys\n"
        "import vbcompress.collection as c, vbcompress.collection.batch as b\n"
        "b.write_manifest = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"c.add({str(root)!r}, [{str(family['cousin'])!r}], fit=c.FitSettings(code_refine_steps=5))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    assert (root / "adapters" / "cousin").is_dir()  # the orphan the kill left
    assert Collection(root).names == names
    assert Collection(root).unpack(["sibling"], tmp_path / "u").paths[0].is_dir()
    add(root, [family["cousin"]], fit=FAST)
    assert Collection(root).names == names + ["cousin"]
    assert not list(root.glob(".tmp-*"))


def test_a_second_writer_gets_a_clear_error(packed, family, tmp_path):
    root = fresh_copy(packed, tmp_path)
    with locked(root):
        with pytest.raises(OutputError, match="another vbcompress process is writing this collection"):
            add(root, [family["cousin"]], fit=FAST)
        with pytest.raises(OutputError, match="locked"):
            remove(root, ["real"])


def test_dense_unpack_at_full_rank_reproduces_the_vb_delta(packed, tmp_path):
    path = packed.unpack(["real"], tmp_path / "dense", dense=True).paths[0]
    dense = load_adapter(path)
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert delta_errors(packed.adapter("real"), dense).total_rel_error <= 1e-5


def test_remove_drops_the_adapter_and_keeps_the_others(packed, tmp_path):
    root = fresh_copy(packed, tmp_path)
    remove(root, ["sibling"])
    coll = Collection(root)
    assert coll.names == ["real"] and not (root / "adapters" / "sibling").exists()
    torch.testing.assert_close(
        coll.adapter("real").modules["encoder.layer.0.attention.self.query"].A,
        packed.adapter("real").modules["encoder.layer.0.attention.self.query"].A,
    )


def test_codes_are_stored_compactly_and_bytes_are_the_file_tensors(packed):
    entry = packed.entry("real")
    with safe_open(str(packed.path / "adapters" / "real" / "codes.safetensors"), "pt") as f:
        idx, w = f.get_tensor("indices"), f.get_tensor("weights")
    assert idx.dtype == torch.uint8 and w.dtype == torch.float16  # N=64: one byte per index
    assert entry.codes_bytes == idx.numel() + 2 * w.numel()
    assert idx.shape[0] == sum(entry.rank * (m.in_features + m.out_features) for m in load_adapter(MINILM_ADAPTER).modules.values()) // 128
    assert packed.total_bytes == packed.bank_bytes + sum(e.marginal_bytes for e in packed.entries.values())


def test_name_clash_unknown_name_and_foreign_base_are_refused(packed, family, tmp_path):
    root = fresh_copy(packed, tmp_path)
    with pytest.raises(SettingError, match="already has an adapter named 'real'"):
        add(root, [family["cousin"]], names=["real"])
    with pytest.raises(SettingError, match="no adapter 'nope' in the collection"):
        Collection(root).unpack(["nope"], tmp_path / "u")
    with pytest.raises(ShapeError, match="is for base model 'gpt2'"):
        add(root, [ADAPTERS / "gpt2-tigrinya-causal"])
    with pytest.raises(FormatError, match="not a vbcompress collection"):
        add(tmp_path, [family["cousin"]])


def test_adapter_that_does_not_fit_the_vector_length_is_refused(packed, tmp_path):
    root = fresh_copy(packed, tmp_path)
    odd = load_adapter(MINILM_ADAPTER)
    odd.modules = {f"other.{n}": m for n, m in odd.modules.items()}
    for m in odd.modules.values():
        m.name, m.A, m.B = f"other.{m.name}", m.A[:, :48].contiguous(), m.B[:48].contiguous()
    write_peft_lora(odd, tmp_path / "odd")
    with pytest.raises(ShapeError, match="not divisible by vector length 128"):
        add(root, [tmp_path / "odd"], allow_mixed_bases=True)
    assert Collection(root).names == packed.names


def test_pack_refuses_mixed_bases_unless_allowed(tmp_path, family):
    with pytest.raises(ShapeError, match="base model"):
        pack([family["real"], ADAPTERS / "gpt2-tigrinya-causal"], tmp_path / "c", FAST)
    assert not (tmp_path / "c").exists()


def test_cli_pack_add_inspect_unpack_remove(tmp_path, family):
    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    root = tmp_path / "c"
    bank_only = ("--hold", "bank", "--max-error", 1)
    run("pack", family["real"], family["sibling"], "-o", root, "-N", 64, "-L", 128, "--iters", 2, "--refine-steps", 5, *bank_only, "--json")
    added = json.loads(run("add", root, family["cousin"], "--code-refine-steps", 5, *bank_only, "--json").stdout)["added"]
    assert [e["name"] for e in added] == ["cousin"]
    info = json.loads(run("inspect", root, "--json").stdout)
    assert set(info["adapters"]) == {"minilm-l6-bias-st", "sibling", "cousin"}
    assert info["total_bytes"] == info["bank_bytes"] + sum(a["marginal_bytes"] for a in info["adapters"].values())
    assert "cousin" in run("inspect", root).stdout
    run("unpack", root, "cousin", "sibling", "-o", tmp_path / "u")
    assert load_adapter(tmp_path / "u" / "cousin").ranks == [Collection(root).entry("cousin").rank]
    run("remove", root, "cousin")
    result = CliRunner().invoke(main, ["unpack", str(root), "cousin", "-o", str(tmp_path / "v")])
    assert result.exit_code == 2 and "no adapter 'cousin'" in result.stderr and not (tmp_path / "v").exists()
    again = CliRunner().invoke(main, ["add", str(root), str(family["sibling"])])  # the same source: already in
    assert again.exit_code == 0 and "skipped 1" in again.stdout
    clash = CliRunner().invoke(main, ["add", str(root), str(family["cousin"]), "--name", "sibling"])
    assert clash.exit_code == 2 and clash.stderr.count("\n") == 1 and "already has an adapter named 'sibling'" in clash.stderr
    assert "--name" in clash.stderr
    mixed = CliRunner().invoke(main, ["add", str(root), str(ADAPTERS / "gpt2-tigrinya-causal")])
    assert mixed.exit_code == 2 and "--allow-mixed-bases" in mixed.stderr


def test_a_corrupt_bank_is_detected(packed, tmp_path):
    root = fresh_copy(packed, tmp_path)
    bank = Collection(root).bank.clone()
    bank[0, 0] += 1
    save_file({"bank": bank}, root / "bank.safetensors")
    with pytest.raises(FormatError, match="not the bank this collection's codes were fitted to"):
        Collection(root).adapter("real")


def test_inputs_are_never_modified(family, tmp_path):
    before = {k: digest(v) for k, v in family.items() if k != "_" and os.path.isdir(v)}
    pack([family["real"], family["cousin"]], tmp_path / "c", FAST)
    add(tmp_path / "c", [family["sibling"]], fit=FAST)
    assert {k: digest(v) for k, v in family.items() if k != "_" and os.path.isdir(v)} == before


def test_each_adapter_weighs_equally_so_a_large_one_cannot_swallow_the_bank(family, tmp_path):
    loud = load_adapter(MINILM_ADAPTER)
    gen = torch.Generator().manual_seed(1)
    for m in loud.modules.values():  # another adapter of the base, 30× the norm of the real one
        m.B = 30 * (m.B + m.B.std() * torch.randn(m.B.shape, generator=gen))
    write_peft_lora(loud, tmp_path / "loud")
    pack([family["real"], tmp_path / "loud"], tmp_path / "c", FAST, quality=BANK_ONLY)
    coll = Collection(tmp_path / "c")
    quiet, large = coll.entry("minilm-l6-bias-st").rel_error, coll.entry("loud").rel_error
    assert quiet < 1.5 * large and large < 1.5 * quiet


def test_removing_the_first_or_a_middle_adapter_keeps_exactly_the_others(family, tmp_path):
    root = tmp_path / "c"
    pack([family["real"], family["sibling"], family["cousin"]], root, FAST, names=["a", "b", "c"], quality=BANK_ONLY)
    before = {n: Collection(root).adapter(n).delta_weights() for n in ("a", "b", "c")}
    remove(root, ["b"])
    assert Collection(root).names == ["a", "c"] and sorted(p.name for p in (root / "adapters").iterdir()) == ["a", "c"]
    remove(root, ["a"])
    coll = Collection(root)
    assert coll.names == ["c"] and [p.name for p in (root / "adapters").iterdir()] == ["c"]
    for name, delta in coll.adapter("c").delta_weights().items():
        torch.testing.assert_close(delta, before["c"][name])


def test_an_add_against_a_bank_that_no_longer_matches_its_hash_writes_nothing(packed, family, tmp_path):
    for workers in (1, 2):
        root = fresh_copy(packed, tmp_path / f"w{workers}")
        bank = Collection(root).bank.clone()
        bank[0] += 1  # a bank swapped behind the manifest: codes fitted to it would decode wrong everywhere
        save_file({"bank": bank}, root / "bank.safetensors")
        before = digest(root)
        with pytest.raises(FormatError, match="not the bank this collection's codes were fitted to"):
            add(root, [family["cousin"]], fit=FAST, workers=workers)
        assert digest(root) == before


def test_readding_a_source_whose_weights_changed_fails_as_changed_not_skipped(packed, family, tmp_path):
    root = fresh_copy(packed, tmp_path)
    src = tmp_path / "evolving"
    shutil.copytree(family["cousin"], src)
    add(root, [src], fit=FAST)
    again = add(root, [src], fit=FAST)
    assert again.skipped == [str(src)] and not again.added
    changed = load_adapter(src)
    for m in changed.modules.values():
        m.B = m.B * 1.5
    write_peft_lora(changed, src)
    with pytest.raises(SettingError, match="its weights changed since it was added"):
        add(root, [src], fit=FAST)


def test_unpack_at_the_default_bank_size_writes_peft_index_layout(family, tmp_path):
    """N=256, the default: a collection stores indices as uint8 (all fit), but PEFT's own layout moves to int16
    exactly at 256 and PEFT must decode what unpack writes as the collection does."""
    fit = FitSettings(num_vectors=256, vector_length=128, iters=2, refine_steps=5, code_refine_steps=5)
    pack([family["real"]], tmp_path / "c", fit, names=["real"], quality=BANK_ONLY)
    coll = Collection(tmp_path / "c")
    coll.unpack(["real"], tmp_path / "u")
    with safe_open(str(tmp_path / "u" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith("_topk_indices")} == {torch.int16}
    held = coll.adapter("real")
    theirs = peft_delta_weights(tmp_path / "u", held)
    for name, m in held.modules.items():
        torch.testing.assert_close(theirs[name], m.delta_weight(), rtol=1e-4, atol=1e-6)


def test_a_byte_budget_chooses_the_largest_bank_whose_collection_fits(family, tmp_path):
    """pack --max-bytes / --target-ratio: the collection's bank and codes, as written, fit the budget, and the
    next bank size up would not have."""
    from vbcompress.settings import SizeSettings

    sources = [family["real"], family["sibling"]]
    fp16 = sum(load_adapter(s).fp16_bytes() for s in sources)
    fit = FitSettings(vector_length=128, iters=2, refine_steps=5, code_refine_steps=5)
    summary = pack(sources, tmp_path / "c", fit, names=["real", "sibling"], quality=BANK_ONLY, size=SizeSettings(target_ratio=0.2))
    n = summary.settings["num_vectors"]
    assert summary.budget == int(0.2 * fp16) and summary.total_bytes <= summary.budget
    bigger = pack(sources, tmp_path / "d", replace(fit, num_vectors=2 * n), names=["real", "sibling"], quality=BANK_ONLY)
    assert bigger.total_bytes > summary.budget
    result = CliRunner().invoke(main, ["pack", str(family["real"]), "-o", str(tmp_path / "e"), "--max-bytes", "1000"])
    assert result.exit_code == 2 and "--max-bytes allows 1000 bytes for the collection" in result.stderr


def test_a_shared_bank_is_fitted_and_recorded_with_the_shared_bank_settings(packed, family, tmp_path):
    """A collection's bank keeps the gentler refine rate and full alternation (one adapter's faster defaults kept
    less KL on a joint bank), records them, and a rate the caller chose is kept."""
    from vbcompress.collection.encode import SHARED_BANK

    assert FitSettings().refine_lr != SHARED_BANK["refine_lr"]
    recorded = packed.manifest.settings
    assert {k: recorded[k] for k in SHARED_BANK} == SHARED_BANK
    pack([family["real"]], tmp_path / "c", replace(FAST, refine_lr=0.01), names=["real"], quality=BANK_ONLY)
    assert Collection(tmp_path / "c").manifest.settings["refine_lr"] == 0.01
