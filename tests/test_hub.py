"""The Hub workflow against a local stand-in server (tests/hubserver.py): nothing here leaves the machine.

Commands run in a subprocess, as users run them, because huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

from vbcompress import inspect_adapter, load_adapter, to_lora
from vbcompress.errors import HubError
from vbcompress.hub import HubRef, parse_ref, select_files
from vbcompress.metrics import delta_errors

from .conftest import ADAPTERS, MINILM_ADAPTER, MINILM_BASE, outputs_with_delta
from .hubserver import FakeHub, Repo

pytestmark = pytest.mark.slow  # a fake Hub in subprocesses: the full suite only

TOKEN = "hf_test_token"
FAST = ["-N", "32", "--iters", "3", "--refine-steps", "20"]


@pytest.fixture(scope="module")
def hub():
    adapter = {p.name: p for p in MINILM_ADAPTER.iterdir()}
    repos = {
        # Extra files a real repo holds next to the adapter: none of them may be downloaded.
        "alice/minilm-lora": Repo({**adapter, "training_args.bin": b"\0" * 1000, "checkpoint-10/adapter_model.safetensors": b"x"}),
        "alice/collection": Repo({f"minilm/{name}": path for name, path in adapter.items()} | {"README.md": b"# several adapters\n"}),
        "alice/private-lora": Repo(adapter, private=True),
        "alice/gated-lora": Repo(adapter, gated=True),
        "alice/not-an-adapter": Repo({"README.md": b"# notes\n", "config.json": b"{}"}),
        "sentence-transformers/all-MiniLM-L6-v2": Repo.from_folder(MINILM_BASE),
    }
    with FakeHub(repos, token=TOKEN) as server:
        yield server


@pytest.fixture
def cli(hub, tmp_path):
    """Run ``vbcompress ARGS`` against the fake Hub with a fresh cache; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")

    def run(*args, cwd=tmp_path, **extra_env):
        hub.requests.clear()
        return subprocess.run(
            [sys.executable, "-m", "vbcompress.cli", *map(str, args)],
            cwd=cwd,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


def one_line_error(result, *fragments):
    """Exit 2 and one error line (after any progress bars), naming the input and the problem."""
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---", 3)])


def test_hub_downloads_shrinks_writes_card_and_pushes(hub, cli, tmp_path):
    out = tmp_path / "out"
    result = cli("hub", "alice/minilm-lora", "-o", out, *FAST, "--push-to", "bob/minilm-vb", "--private", "--token", TOKEN)
    assert result.returncode == 0, result.stderr

    # Only the adapter, its config and the model card came down.
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert not any("training_args" in p or "checkpoint-10" in p for _, p in hub.requests)

    report = json.loads((out / "vbcompress.json").read_text())
    commit = hub.repos["alice/minilm-lora"].sha
    assert report["hub_source"] == {"ref": "alice/minilm-lora", "repo": "alice/minilm-lora", "revision": "main", "commit": commit}
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "peft"
    assert {"vblora", "vbcompress"} <= set(meta["tags"])
    assert (meta["source_adapter"], meta["source_revision"]) == ("alice/minilm-lora", commit)
    for figure in (f"{report['bytes']['ratio']:.1%}", f"{report['total_rel_error']:.4f}", f"{report['svd_baseline']['rel_error']:.4f}"):
        assert figure in card
    assert 'PeftModel.from_pretrained(base, "bob/minilm-vb")' in card

    # The push created a private repo and uploaded exactly the folder, in one commit, with a valid card.
    [created] = hub.created
    assert (created["organization"], created["name"], created["visibility"]) == ("bob", "minilm-vb", "private")
    assert hub.uploads["bob/minilm-vb"] == {p.name: p.read_bytes() for p in out.iterdir()}
    assert card in hub.validated
    assert f"pushed:    {hub.url}/bob/minilm-vb" in result.stdout


def test_hub_output_loads_in_peft_like_any_lora2vb_output(cli, tmp_path, minilm):
    from peft import PeftModel

    out = tmp_path / "out"
    assert cli("hub", "alice/minilm-lora@main", "-o", out, *FAST).returncode == 0
    _, fresh, batch = minilm
    model = PeftModel.from_pretrained(fresh(), str(out)).eval()
    assert type(model.peft_config["default"]).__name__ == "VBLoRAConfig"
    with torch.no_grad():
        got = model(**batch).last_hidden_state
    torch.testing.assert_close(got, outputs_with_delta(fresh, batch, load_adapter(out)), atol=1e-5, rtol=1e-5)


def test_hub_ids_work_wherever_a_path_does(cli, tmp_path):
    inspected = cli("inspect", "alice/collection/minilm", "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["num_modules"] == inspect_adapter(MINILM_ADAPTER).num_modules

    dense = cli("vb2lora", "alice/minilm-lora", "-o", tmp_path / "dense", "--rank", "4")
    assert dense.returncode == 0, dense.stderr
    # the Hub copy is the local adapter: its rank-4 truncation is exactly the local one's
    local = to_lora(MINILM_ADAPTER, tmp_path / "dense-local", 4)
    assert delta_errors(load_adapter(tmp_path / "dense-local"), load_adapter(tmp_path / "dense")).total_rel_error < 1e-6
    assert json.loads((tmp_path / "dense" / "vbcompress.json").read_text())["rel_error"] == pytest.approx(local.rel_error)

    data = tmp_path / "sentences.txt"
    data.write_text("A cat sat on the mat.\nThe stock market fell sharply today.\n")
    evaluated = cli(
        "eval", "alice/minilm-lora", tmp_path / "dense", "--base", "sentence-transformers/all-MiniLM-L6-v2", "--data", data, "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    function = json.loads(evaluated.stdout)["function"]
    assert 0 < function["effect_retention"] < 1

    merged = cli("merge", "--base", "sentence-transformers/all-MiniLM-L6-v2", "--adapter", "alice/minilm-lora", "-o", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    name = "encoder.layer.0.attention.self.query"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f, safe_open(str(MINILM_BASE / "model.safetensors"), "pt") as g:
        expected = g.get_tensor(f"{name}.weight") + load_adapter(MINILM_ADAPTER).modules[name].delta_weight()
        torch.testing.assert_close(f.get_tensor(f"{name}.weight"), expected, rtol=1e-5, atol=1e-6)


def test_a_local_path_wins_over_a_hub_id(cli, hub, tmp_path):
    import shutil

    shutil.copytree(MINILM_ADAPTER, tmp_path / "alice" / "minilm-lora")
    result = cli("inspect", "alice/minilm-lora", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["file"] == "alice/minilm-lora/adapter_model.safetensors"
    assert hub.requests == []


def test_offline_mode_uses_the_cache_and_says_when_it_cannot(cli, hub, tmp_path):
    assert cli("inspect", "alice/minilm-lora").returncode == 0  # fills the cache
    offline = cli("hub", "alice/minilm-lora", "-o", tmp_path / "out", *FAST, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert hub.requests == []
    local = cli("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "local", *FAST)  # the same fit from the local copy
    assert local.returncode == 0, local.stderr
    same = "adapter_model.safetensors"
    assert (tmp_path / "out" / same).read_bytes() == (tmp_path / "local" / same).read_bytes()
    missing = cli("hub", "alice/collection/minilm", "-o", tmp_path / "out2", *FAST, HF_HUB_OFFLINE="1")
    one_line_error(missing, "alice/collection/minilm", "not in the local cache", "HF_HUB_OFFLINE")
    assert not (tmp_path / "out2").exists()


def test_offline_mode_reads_a_cache_filled_file_by_file_as_peft_does(cli, hub, tmp_path):
    """PEFT and transformers download with hf_hub_download, one file at a time: no tree listing is cached."""
    fetch = "import sys; from huggingface_hub import hf_hub_download as get; [get(sys.argv[1], f) for f in sys.argv[2:]]"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    for repo, files in (
        ("alice/minilm-lora", ["adapter_config.json", "adapter_model.safetensors"]),
        ("alice/gated-lora", ["adapter_config.json"]),
    ):
        subprocess.run([sys.executable, "-c", fetch, repo, *files], env={**env, "HF_TOKEN": TOKEN}, check=True, capture_output=True)
    offline = cli("inspect", "alice/minilm-lora", "--json", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert len(json.loads(offline.stdout)["modules"]) == len(load_adapter(MINILM_ADAPTER).modules) and hub.requests == []
    half = cli("lora2vb", "alice/gated-lora", "-o", tmp_path / "o", *FAST, HF_HUB_OFFLINE="1")
    one_line_error(half, "alice/gated-lora", "the local cache holds only adapter_config.json", "download it once online")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("ref", "env", "fragments"),
    [
        ("alice/nobody", {}, ["alice/nobody", "no such repository on the Hub"]),
        ("alice/private-lora", {}, ["alice/private-lora", "no such repository", "HF_TOKEN"]),
        ("alice/gated-lora", {}, ["alice/gated-lora", "gated repository", "HF_TOKEN"]),
        ("alice/minilm-lora@v9", {}, ["alice/minilm-lora@v9", "revision 'v9' not found"]),
        ("alice/not-an-adapter", {}, ["alice/not-an-adapter", "no adapter files in the repository", "README.md"]),
    ],
)
def test_hub_errors_are_one_line_and_write_nothing(cli, tmp_path, ref, env, fragments):
    result = cli("hub", ref, "-o", tmp_path / "out", *FAST, **env)
    one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_private_and_gated_repos_work_with_a_token(cli, tmp_path):
    private = cli("inspect", "alice/private-lora", "--json", HF_TOKEN=TOKEN)
    assert private.returncode == 0, private.stderr
    assert json.loads(private.stdout)["lora_params"] == inspect_adapter(MINILM_ADAPTER).lora_params
    gated = cli("hub", "alice/gated-lora", "-o", tmp_path / "out", *FAST, "--token", TOKEN)
    assert gated.returncode == 0, gated.stderr
    assert json.loads((tmp_path / "out" / "vbcompress.json").read_text())["hub_source"]["repo"] == "alice/gated-lora"


def test_unreachable_hub_and_nothing_cached(cli, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli("hub", "alice/minilm-lora", "-o", tmp_path / "out", *FAST, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    one_line_error(result, "alice/minilm-lora", "cannot reach the Hub", "not in the local cache")


def test_push_without_write_access_fails_before_any_work(cli, hub, tmp_path):
    result = cli("hub", "alice/minilm-lora", "-o", tmp_path / "out", *FAST, "--push-to", "bob/other", "--token", "hf_wrong")
    one_line_error(result, "bob/other", "not authorised to write")
    assert not (tmp_path / "out").exists()
    assert not any("/resolve/" in path for _, path in hub.requests)


def test_bad_push_target_is_refused_before_any_work(cli, tmp_path):
    one_line_error(cli("hub", "alice/minilm-lora", "-o", tmp_path / "out", "--push-to", "not a repo"), "not a repo", "owner/name")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("alice/lora", HubRef("alice/lora")),
        ("alice/lora@v1.0", HubRef("alice/lora", "", "v1.0")),
        ("alice/lora/sub/dir@refs/pr/3", HubRef("alice/lora", "sub/dir", "refs/pr/3")),
        ("/abs/path", None),
        ("./rel/path", None),
        ("../up/path", None),
        ("single", None),
        ("alice/../etc", None),
    ],
)
def test_parse_ref(text, ref):
    assert parse_ref(text) == ref


def test_file_selection_mirrors_local_folders():
    ref = HubRef("a/b")
    assert select_files(
        ref, ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "x.bin", "README.md"], "adapter"
    ) == (["adapter_config.json", "adapter_model.safetensors", "README.md"], "")
    assert select_files(ref, ["pytorch_lora_weights.safetensors", "other.safetensors"], "adapter") == (
        ["pytorch_lora_weights.safetensors"],
        "pytorch_lora_weights.safetensors",
    )
    assert select_files(HubRef("a/b", "v2/lora.safetensors"), ["v1/lora.safetensors", "v2/lora.safetensors"], "adapter") == (
        ["v2/lora.safetensors"],
        "v2/lora.safetensors",
    )
    with pytest.raises(HubError, match="2 .safetensors files; name one as a/b/FILE"):
        select_files(ref, ["one.safetensors", "two.safetensors"], "adapter")
    files, _ = select_files(
        ref, ["config.json", "model.safetensors", "vocab.txt", "onnx/model.onnx", "1_Pooling/config.json", "pytorch_model.bin"], "base"
    )
    assert files == ["config.json", "model.safetensors", "vocab.txt"]
    with pytest.raises(HubError, match="no .safetensors weights"):
        select_files(ref, ["config.json", "pytorch_model.bin"], "base")


def test_batch_add_with_a_hub_id_a_missing_path_and_a_nan_adapter(cli, tmp_path):
    from vbcompress import FitSettings
    from vbcompress.collection import Collection, pack

    pack([MINILM_ADAPTER], tmp_path / "coll", FitSettings(num_vectors=32, vector_length=128, iters=2, refine_steps=5))
    listing = tmp_path / "list.txt"
    listing.write_text(f"alice/minilm-lora\n{tmp_path / 'gone'}\n{ADAPTERS / 'gemma-2b-sql-qv-fp16'}\nalice/nobody\n")
    result = cli(
        "add",
        tmp_path / "coll",
        "--from-list",
        listing,
        "--name",
        "from-hub",
        "--name",
        "a",
        "--name",
        "b",
        "--name",
        "c",
        "--code-refine-steps",
        "5",
        "--json",
    )
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert [e["name"] for e in report["added"]] == ["from-hub"]
    assert report["added"][0]["hub_source"]["repo"] == "alice/minilm-lora"
    reasons = {f["source"]: f["error"] for f in report["failed"]}
    assert "no such file or directory" in reasons[str(tmp_path / "gone")]
    assert "NaN/Inf" in reasons[str(ADAPTERS / "gemma-2b-sql-qv-fp16")]
    assert "no such repository on the Hub" in reasons["alice/nobody"]
    assert Collection(tmp_path / "coll").names == ["minilm-l6-bias-st", "from-hub"]
    assert json.loads((tmp_path / "coll" / "failures.json").read_text()).keys() == reasons.keys()
