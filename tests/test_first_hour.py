"""What a newcomer sees in the first hour: errors that say what to do, and hints only where they work."""

from __future__ import annotations

import sys

from click.testing import CliRunner

from vbcompress.cli import main

from .conftest import ADAPTERS, MINILM_ADAPTER

FAST = ("-N", 16, "--iters", 1, "--refine-steps", 0)


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def test_overwrite_is_offered_only_where_it_would_work(tmp_path):
    first = cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "o", *FAST)
    assert first.exit_code == 0, first.output
    again = cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "o", *FAST)
    assert again.exit_code == 2 and "--overwrite" in again.stderr and "earlier vbcompress output" in again.stderr
    assert cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "o", "--overwrite", *FAST).exit_code == 0


def test_a_config_or_a_readme_given_as_weights_says_what_it_is(tmp_path):
    for name, text, said in (
        ("adapter_config.json", '{"r": 8}', "a JSON file (an adapter's config), not adapter weights"),
        ("README.md", "# my adapter\n", "a text file, not adapter weights"),
    ):
        (tmp_path / name).write_text(text)
        result = cli("inspect", tmp_path / name)
        assert result.exit_code == 2 and said in result.stderr and "folder" in result.stderr


def test_a_missing_local_looking_path_is_no_such_file_not_a_hub_error(tmp_path, monkeypatch):
    (tmp_path / "adapters").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for given in ("adapters/typo", "./typo/x", "../nowhere/x"):
        result = cli("inspect", given)
        assert result.exit_code == 2 and "no such file" in result.stderr and "Hub" not in result.stderr, (given, result.stderr)


def test_a_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    (tmp_path / "base").mkdir()
    result = cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "o", "--base", tmp_path / "base", *FAST)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "pip install 'vbcompress[models]'" in result.stderr


def test_help_does_not_load_torch():
    import subprocess

    code = "import sys; from vbcompress.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("False"), out.stdout


def test_overwrite_never_replaces_a_plain_peft_adapter_folder(tmp_path):
    import shutil

    shutil.copytree(MINILM_ADAPTER, tmp_path / "someones-lora")  # adapter_config.json at the top, no vbcompress.json
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "someones-lora").iterdir())
    result = cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "someones-lora", "--overwrite", *FAST)
    assert result.exit_code == 2 and "not a vbcompress output" in result.stderr
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "someones-lora").iterdir()) == before


def test_an_output_named_safetensors_is_that_one_kohya_file(tmp_path):
    """`-o out/anime.safetensors --to kohya` writes out/anime.safetensors (what ComfyUI loads), replaces only a
    file vbcompress wrote, and says so when asked for a folder format under a file name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vbcompress import load_adapter

    src = ADAPTERS / "sd15-unet-anime-diffusers"
    out = tmp_path / "out" / "anime.safetensors"
    result = cli("resize", src, "-o", out, "--rank", 2, "--to", "kohya")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["anime.safetensors"] and out.is_file()
    assert f"wrote {out} (kohya)" in result.output
    written = load_adapter(out)
    assert written.source_format == "kohya" and written.ranks == [2]
    again = cli("resize", src, "-o", out, "--rank", 2)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert cli("resize", src, "-o", out, "--rank", 3, "--overwrite").exit_code == 0
    assert load_adapter(out).ranks == [3]

    theirs = tmp_path / "theirs.safetensors"
    shutil.copy(out, theirs)
    save_file(load_file(theirs), theirs)  # the same tensors, but not a file vbcompress wrote (no mark in its header)
    before = theirs.read_bytes()
    refused = cli("resize", src, "-o", theirs, "--rank", 2, "--overwrite")
    assert refused.exit_code == 2 and "not a file vbcompress wrote" in refused.stderr and theirs.read_bytes() == before
    folder_format = cli("resize", src, "-o", tmp_path / "x.safetensors", "--rank", 2, "--to", "peft")
    assert folder_format.exit_code == 2 and "name a folder" in folder_format.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_progress_off_a_terminal_is_plain_lines_and_quiet_silences_it(tmp_path, monkeypatch):
    """Piped logs get whole lines (no carriage-return bars); -q/--quiet, before or after the command, none."""
    from vbcompress.cli import progress

    monkeypatch.setattr(progress, "PLAIN_AFTER_S", 0.0)  # every stage here is quick: say each at once
    monkeypatch.setattr(progress, "quiet", False)  # and put the flag back however the test ends
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    logged = cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "a", *FAST)
    assert logged.exit_code == 0, logged.output
    assert "\r" not in logged.stderr and "\x1b" not in logged.stderr
    lines = logged.stderr.strip().splitlines()
    assert lines and all(": step " in line for line in lines), lines
    for args in (["-q", "lora2vb"], ["lora2vb", "--quiet"]):
        quiet = cli(*args, MINILM_ADAPTER, "-o", tmp_path / "b", "--overwrite", *FAST)
        assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr


def test_eval_compares_sizes_like_with_like(tmp_path):
    """Two copies of one fp32 adapter are the same size as stored; the fp16 figure is named as such."""
    result = cli("eval", MINILM_ADAPTER, MINILM_ADAPTER)
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("size:")]
    assert "= 100.0% of REF as stored" in line and "200.0% of REF's LoRA at fp16" in line


def test_unpack_and_merge_write_their_own_model_cards(tmp_path):
    """An unpacked adapter says where it came from and what the collection kept (a warning first when a plain
    representation keeps more); a merged model's card describes the merge, not the base alone, and keeps the
    base's license."""
    import shutil

    from vbcompress import FitSettings, QualitySettings
    from vbcompress.collection import Collection, pack

    pack(
        [MINILM_ADAPTER],
        tmp_path / "c",
        FitSettings(num_vectors=16, iters=1, refine_steps=0),
        names=["st"],
        quality=QualitySettings(hold="bank", max_error=1.0),
    )
    coll = Collection(tmp_path / "c")
    assert cli("unpack", tmp_path / "c", "st", "-o", tmp_path / "u").exit_code == 0
    card = (tmp_path / "u" / "README.md").read_text()
    assert "# st, unpacked from a vbcompress collection" in card and "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    verdict = coll.entry("st").verdict
    assert verdict["line"] in card
    assert ("**Warning" in card) == (verdict["kind"] == "plain" or verdict["keeps"] != "much")

    from .conftest import MINILM_BASE

    base = tmp_path / "base"
    shutil.copytree(MINILM_BASE, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# all-MiniLM-L6-v2\nThe base's own card.\n")
    merged = cli("merge", "--base", base, "--adapter", MINILM_ADAPTER, "-o", tmp_path / "m")
    assert merged.exit_code == 0, merged.output
    card = (tmp_path / "m" / "README.md").read_text()
    assert "merged in" in card and "license: apache-2.0" in card and "The base's own card." not in card
