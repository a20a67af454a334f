"""Bad input from the wild: every case ends in a correct result or one line naming the file, exit 2, nothing
written. The named cases are the ones an outside fuzz run found; the property tests fuzz the readers."""

from __future__ import annotations

import ast
import io
import json
import shutil
import struct
import zipfile

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vbcompress import load_adapter
from vbcompress.cli import main
from vbcompress.errors import VBCompressError

from .conftest import MINILM_ADAPTER

WEIGHTS = (MINILM_ADAPTER / "adapter_model.safetensors").read_bytes()
CONFIG = json.loads((MINILM_ADAPTER / "adapter_config.json").read_text())
FAST_ARGS = ["-N", "32", "-L", "128", "--iters", "2", "--refine-steps", "5"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def adapter_dir(tmp_path, weights: bytes | None = None, config: dict | str | None = None, name="adapter_model.safetensors"):
    d = tmp_path / "a"
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(WEIGHTS if weights is None else weights)
    (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(CONFIG if config is None else config))
    return d


def with_header(header: dict | str, data: bytes = b"") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def minilm_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(MINILM_ADAPTER / "adapter_model.safetensors")


def saved(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


# ------------------------------------------------------------------ named cases


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"dtype": "F32", "shape": [2], "data_offsetz": [0, 8]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": None}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": 8}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8"),
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "invalid shape"),
        ("not an object", "not an object"),
    ],
)
def test_broken_header_entries(tmp_path, entry, problem):
    d = adapter_dir(tmp_path, with_header({"base_model.model.q.lora_A.weight": entry}, b"\0" * 8))
    one_line_error(run("inspect", d), "adapter_model.safetensors", problem)


def test_overlapping_tensors_and_deep_json(tmp_path):
    header = {
        k: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        for k in ("base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight")
    }
    result = run("inspect", adapter_dir(tmp_path, with_header(header, b"\0" * 8)))
    one_line_error(result, "adapter_model.safetensors")
    # the message's own words, after the path (which holds this test's name, "…overlapping_tensors…")
    assert "overlap" in result.stderr.split("adapter_model.safetensors", 1)[1], result.stderr
    one_line_error(run("inspect", adapter_dir(tmp_path, with_header("[" * 100_000 + "]" * 100_000))), "corrupt safetensors header")


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"alpha_pattern": ["q", 16]}, "alpha_pattern must be an object"),
        ({"alpha_pattern": {"(unclosed": 16}}, "not a regular expression"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"lora_alpha": 1e300}, "lora_alpha"),
        ({"r": 0}, "r = 0"),
        ({"r": 4}, "the config says r = 4"),
        ({"use_rslora": "yes"}, "use_rslora"),
    ],
)
def test_broken_configs(tmp_path, change, problem):
    one_line_error(
        run("inspect", adapter_dir(tmp_path, config={**CONFIG, **change})), "adapter_config.json" if "says" not in problem else "a", problem
    )


def test_missing_peft_type_is_read_as_lora(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k != "peft_type"}
    assert load_adapter(adapter_dir(tmp_path, config=config)).num_lora_params == 73_728


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_factors_that_are_not_floating_point(tmp_path, dtype):
    tensors = {k: (v * 100).to(dtype) for k, v in minilm_tensors().items()}
    one_line_error(run("inspect", adapter_dir(tmp_path, saved(tensors))), "not floating point")


def test_header_relabelling_float32_as_int32(tmp_path):
    raw = WEIGHTS.replace(b'"F32"', b'"I32"')
    one_line_error(run("lora2vb", adapter_dir(tmp_path, raw), "-o", tmp_path / "o", *FAST_ARGS), "not floating point")
    assert not (tmp_path / "o").exists()


def test_rank_zero_factors(tmp_path):
    tensors = {"base_model.model.q.lora_A.weight": torch.zeros(0, 16), "base_model.model.q.lora_B.weight": torch.zeros(16, 0)}
    one_line_error(run("inspect", adapter_dir(tmp_path, saved(tensors), config={"peft_type": "LORA", "lora_alpha": 8})), "empty factors")


def test_kohya_alpha_that_is_empty(tmp_path):
    tensors = {
        "lora_unet_x.lora_down.weight": torch.randn(4, 16),
        "lora_unet_x.lora_up.weight": torch.randn(16, 4),
        "lora_unet_x.alpha": torch.zeros(0),
    }
    save_file(tensors, tmp_path / "k.safetensors")
    one_line_error(run("inspect", tmp_path / "k.safetensors"), "k.safetensors", "alpha must hold one number")


@pytest.mark.parametrize(
    "meta, problem", [("[1, 2]", "must be a JSON object"), ('{"r": 0}', "r = 0"), ('{"r": 4, "lora_alpha": -1}', "lora_alpha")]
)
def test_diffusers_metadata_is_checked_like_a_config(tmp_path, meta, problem):
    tensors = {"unet.x.lora_A.weight": torch.randn(4, 16), "unet.x.lora_B.weight": torch.randn(16, 4)}
    save_file(tensors, tmp_path / "d.safetensors", metadata={"lora_adapter_metadata": meta})
    one_line_error(run("inspect", tmp_path / "d.safetensors"), "d.safetensors", problem)


def test_vblora_with_float_indices_or_2d_logits(tmp_path):
    vb = {
        "base_model.vblora_vector_bank": torch.randn(8, 16),
        "base_model.model.q.vblora_logits_A_topk_indices": torch.zeros(2, 1, 2),
        "base_model.model.q.vblora_logits_A_topk_weights": torch.full((2, 1, 1), 0.5),
        "base_model.model.q.vblora_logits_B_topk_indices": torch.zeros(1, 2, 2, dtype=torch.uint8),
        "base_model.model.q.vblora_logits_B_topk_weights": torch.full((1, 2, 1), 0.5),
    }
    config = {"peft_type": "VBLORA", "r": 2, "num_vectors": 8, "vector_length": 16, "topk": 2}
    one_line_error(run("inspect", adapter_dir(tmp_path, saved(vb), config=config)), "must be 3-D integers")
    full = {
        "base_model.vblora_vector_bank": torch.randn(8, 16),
        "base_model.model.q.vblora_logits_A": torch.randn(2, 8),
        "base_model.model.q.vblora_logits_B": torch.randn(1, 2, 8),
    }
    one_line_error(
        run("inspect", adapter_dir(tmp_path, saved(full), config={**config, "save_only_topk_weights": False})), "3-D floating logits"
    )


def pickle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_pickle_memory_bombs_are_refused(tmp_path):
    bomb = torch.zeros(1).expand(16, 2**26)  # a stride-0 view: 8 GB of float32 from 4 bytes
    d = adapter_dir(tmp_path, pickle_bytes({"base_model.model.q.lora_A.weight": bomb}), name="adapter_model.bin")
    one_line_error(run("inspect", d), "adapter_model.bin", "zero stride")
    raw = pickle_bytes({"base_model.model.q.lora_A.weight": torch.zeros(4, 16)})
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    (d / "adapter_model.bin").write_bytes(deflated.getvalue())
    one_line_error(run("inspect", d), "adapter_model.bin", "compressed tensor data")


def test_pickles_never_run_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('/tmp/vbcompress-pwned', 'w').write('x')",))

    d = adapter_dir(tmp_path, pickle.dumps({"x": Evil()}), name="adapter_model.bin")
    one_line_error(run("inspect", d), "adapter_model.bin")
    assert not __import__("pathlib").Path("/tmp/vbcompress-pwned").exists()


def test_weights_path_that_is_a_folder_or_a_fifo(tmp_path):
    import os

    (tmp_path / "w.safetensors").mkdir()
    one_line_error(run("inspect", tmp_path / "w.safetensors"), "no adapter found")
    os.mkfifo(tmp_path / "f.safetensors")
    one_line_error(run("inspect", tmp_path / "f.safetensors"), "not a regular file")


def test_untrained_and_vanishing_adapters_compress(tmp_path):
    """PEFT saves lora_B = 0 right after initialisation; a tiny alpha gives the same: ΔW = 0 is no error."""
    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in minilm_tensors().items()}
    result = run("lora2vb", adapter_dir(tmp_path, saved(tensors)), "-o", tmp_path / "o", *FAST_ARGS, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_rel_error"] is None and "n/a" in (tmp_path / "o" / "README.md").read_text()
    shutil.rmtree(tmp_path / "a")
    result = run("lora2vb", adapter_dir(tmp_path, config={**CONFIG, "lora_alpha": 1e-300}), "-o", tmp_path / "o2", *FAST_ARGS)
    assert result.exit_code == 0, result.output


def test_model_card_quotes_what_it_copies_from_the_config(tmp_path):
    hostile = 'x")\nimport os; os.system("echo pwned")  # '
    d = adapter_dir(tmp_path, config={**CONFIG, "base_model_name_or_path": hostile})
    assert run("lora2vb", d, "-o", tmp_path / "o", *FAST_ARGS).exit_code == 0
    card = (tmp_path / "o" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"]
    assert ast.literal_eval(calls[0].args[0]) == hostile
    assert "import os" not in [ast.unparse(n) for n in ast.parse(code).body]


def test_cli_exit_codes_json_errors_debug_and_vector_length_zero(tmp_path, monkeypatch):
    result = run("inspect", MINILM_ADAPTER, "--threshold", "2")
    one_line_error(result, "--threshold 2.0 must be in (0, 1]")
    as_json = run("inspect", tmp_path / "nowhere", "--json")
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["error"].endswith("no such file or directory")
    assert run("inspect", tmp_path / "nowhere", "--debug").exception is not None
    one_line_error(run("lora2vb", MINILM_ADAPTER, "-o", tmp_path / "o", "-L", "0"), "--vector-length must be a positive length")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vbcompress.inspection.inspect_adapter", interrupted)
    assert run("inspect", MINILM_ADAPTER).exit_code == 130


# ------------------------------------------------------------------ fuzzing the readers


def read_or_refuse(path):
    """What a user relies on: a bad file is an Adapter or a VBCompressError, never anything else."""
    try:
        adapter = load_adapter(path)
    except VBCompressError as e:
        assert "\n" not in str(e) and str(e)
        return None
    assert adapter.modules
    return adapter


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(WEIGHTS) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_byte_flips(tmp_path, flips):
    data = bytearray(WEIGHTS)
    header_len = struct.unpack("<Q", WEIGHTS[:8])[0] + 8
    for pos, value in flips:  # mostly in the header, where a flip changes meaning
        data[pos % header_len if pos % 3 else pos] = value
    read_or_refuse(adapter_dir(tmp_path, bytes(data)))


@FUZZ
@given(st.integers(0, len(WEIGHTS)))
def test_fuzz_truncation(tmp_path, cut):
    read_or_refuse(adapter_dir(tmp_path, WEIGHTS[:cut]))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(
    st.sampled_from(["r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "fan_in_fan_out", "peft_type", "target_modules"]),
    JSON,
)
def test_fuzz_config_values(tmp_path, key, value):
    read_or_refuse(adapter_dir(tmp_path, config={**CONFIG, key: value}))


@FUZZ
@given(st.sampled_from(["dtype", "shape", "data_offsets"]), JSON)
def test_fuzz_header_fields(tmp_path, field, value):
    n = struct.unpack("<Q", WEIGHTS[:8])[0]
    header = json.loads(WEIGHTS[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key][field] = value
    read_or_refuse(adapter_dir(tmp_path, with_header(header, WEIGHTS[8 + n :])))
