"""What we write loads where users load it, with the same ΔW: kohya and diffusers files through diffusers'
own readers, mixed-rank PEFT LoRA under PEFT and under a loader that ignores the rank/alpha patterns (vLLM),
and mlx-lm adapters read in both of their layouts."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vbcompress import load_adapter, to_lora
from vbcompress.errors import ShapeError

from .conftest import ADAPTERS, MINILM_ADAPTER, skeleton_model

pytestmark = pytest.mark.slow  # diffusers and kohya round trips: the full suite only

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference here (pip install -e '.[test]')")
SD = ADAPTERS / "sd15-unet-anime-diffusers"


@functools.cache
def dense_svds(path) -> dict:
    """Each module's dense ΔW SVD (float32: the factors below are compared at rtol 1e-4), once per session."""
    return {name: torch.linalg.svd(m.delta_weight(), full_matrices=False) for name, m in load_adapter(path).modules.items()}


def truncated_delta(path, rank: int | dict[str, int]) -> dict[str, torch.Tensor]:
    """Each module's ΔW cut to its top ``rank`` (or ``rank[name]``) singular values, from dense ΔW (shares
    no code with resize)."""
    out = {}
    for name, (u, s, vh) in dense_svds(path).items():
        k = rank if isinstance(rank, int) else rank[name]
        out[name] = ((u[:, :k] * s[:k]) @ vh[:k]).double()
    return out


def test_resize_to_kohya_reads_back_through_diffusers_kohya_converter(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    report = to_lora(SD, tmp_path / "anime-r2", 2, to="kohya")
    written = tmp_path / "anime-r2" / "anime-r2.safetensors"
    assert report.written_format == "kohya" and report.file == written.name
    state, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(written))
    expected = truncated_delta(SD, 2)
    assert len(alphas) == len(expected)
    for name, delta in expected.items():
        block, proj = name.rsplit(".", 1)
        key = f"unet.{block}.processor.{proj}_lora"
        down, up = state[f"{key}.down.weight"].double(), state[f"{key}.up.weight"].double()
        scale = alphas[f"{key}.down.weight.alpha"] / down.shape[0]  # kohya's alpha / r, as the converter names it
        torch.testing.assert_close(scale * up @ down, delta, rtol=1e-4, atol=1e-6)
    # and back: kohya in gives kohya out by default, and --to peft spells the dotted paths again
    again = to_lora(written, tmp_path / "peft", to="peft")
    assert set(load_adapter(tmp_path / "peft").modules) == set(expected) and again.rel_error < 1e-6


def test_resize_to_diffusers_reads_back_through_diffusers_loader(tmp_path):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    to_lora(SD, tmp_path / "d", "auto", to="diffusers")
    state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(tmp_path / "d" / "pytorch_lora_weights.safetensors"), return_lora_metadata=True
    )
    ranks = {n: m.r for n, m in load_adapter(tmp_path / "d").modules.items()}
    assert len(set(ranks.values())) > 1, "the auto rule should choose different ranks here"
    expected = truncated_delta(SD, ranks)
    for name, delta in expected.items():
        got = state[f"{name}.lora_B.weight"].double() @ state[f"{name}.lora_A.weight"].double()
        # the file's own global alpha / r applies to every module: loader-proof scaling
        torch.testing.assert_close((meta["lora_alpha"] / meta["r"]) * got, delta, rtol=1e-4, atol=1e-6)


def test_mixed_rank_peft_output_gives_the_same_delta_with_or_without_the_patterns(tmp_path):
    from peft import PeftModel

    report = to_lora(MINILM_ADAPTER, tmp_path / "auto", "auto")
    assert len({m.rank for m in report.modules}) > 1
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["lora_alpha"] == config["r"]
    model = PeftModel.from_pretrained(skeleton_model(load_adapter(MINILM_ADAPTER)), str(tmp_path / "auto"))
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    layers = {n.removeprefix("base_model.model."): mod for n, mod in model.named_modules() if hasattr(mod, "get_delta_weight")}
    assert len(layers) == len(report.modules)
    for name, layer in layers.items():
        peft_delta = layer.get_delta_weight("default")  # PEFT, rank_pattern and alpha_pattern honoured
        plain = (
            config["lora_alpha"]
            / config["r"]
            * tensors[f"base_model.model.{name}.lora_B.weight"]
            @ tensors[f"base_model.model.{name}.lora_A.weight"]
        )
        torch.testing.assert_close(peft_delta, plain, rtol=1e-5, atol=1e-7)


def test_modules_a_target_format_cannot_name_are_an_error_not_dropped(tmp_path):
    with pytest.raises(ShapeError, match=r"no kohya name: encoder\.layer\.0\.attention\.self\.query"):
        to_lora(MINILM_ADAPTER, tmp_path / "k", to="kohya")
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("layout", ["safetensors", "npz"])
def test_mlx_lm_adapters_read_with_their_scale(tmp_path, layout):
    """mlx-lm writes lora_a [in, r], lora_b [r, out] and adds scale · (x @ a) @ b."""
    source = load_adapter(MINILM_ADAPTER)
    tensors = {}
    for name, m in source.modules.items():
        b, a = m.folded()
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = (a.T / 20.0).contiguous(), b.T.contiguous()
    if layout == "npz":  # the older layout: no config scale given, mlx-lm's default 20.0 applies
        np.savez(tmp_path / "adapters.npz", **{k: v.numpy() for k, v in tensors.items()})
        (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 8}}))
    else:
        save_file({k: v / 2 if k.endswith("lora_b") else v for k, v in tensors.items()}, tmp_path / "adapters.safetensors")
        (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 40.0}}))
    got = load_adapter(tmp_path)
    assert got.source_format == "mlx" and set(got.modules) == set(source.modules)
    for name, m in source.modules.items():
        torch.testing.assert_close(got.modules[name].delta_weight(), m.delta_weight(), rtol=1e-5, atol=1e-7)


def test_a_lone_peft_file_with_its_config_in_the_safetensors_header(tmp_path):
    """No adapter_config.json: rank and alpha come from the header's lora_adapter_metadata."""
    from safetensors.torch import load_file

    config = json.loads((MINILM_ADAPTER / "adapter_config.json").read_text())
    save_file(
        load_file(MINILM_ADAPTER / "adapter_model.safetensors"),
        tmp_path / "lone.safetensors",
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)},
    )
    got, source = load_adapter(tmp_path / "lone.safetensors"), load_adapter(MINILM_ADAPTER)
    for name, m in source.modules.items():
        torch.testing.assert_close(got.modules[name].delta_weight(), m.delta_weight())
    save_file(load_file(MINILM_ADAPTER / "adapter_model.safetensors"), tmp_path / "bare.safetensors")
    with pytest.raises(Exception, match="missing adapter_config.json"):
        load_adapter(tmp_path / "bare.safetensors")
