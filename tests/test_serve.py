"""Serving a collection: one adapter at a time as a dense LoRA folder in a bounded cache, and vLLM's own
resolver and PEFT helper code reading what the plugin hands it. What a user relies on: the folder computes the
adapter's ΔW under any loader's scaling rule, the cache stays within its bytes and survives several processes,
and vLLM gets a request for held names only."""

from __future__ import annotations

import asyncio
import copy
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

from vbcompress import FitSettings, QualitySettings, load_adapter, write_peft_lora
from vbcompress.collection import Collection, add, pack, remove
from vbcompress.errors import SettingError

from .conftest import ADAPTERS, MINILM_ADAPTER

FAST = FitSettings(num_vectors=64, vector_length=128, iters=4, refine_steps=30, code_refine_steps=10)
BANK_ONLY = QualitySettings(hold="bank", max_error=1.0)
CLOSE = QualitySettings(max_error=0.05)  # held as low-rank factors near their source rank
BASE = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real MiniLM adapter (rank 8) and a rank-4 cousin held as low-rank factors, and a perturbed sibling
    held as bank codes: both codecs a server may be asked for."""
    root = tmp_path_factory.mktemp("serve")
    cousin, sibling = load_adapter(MINILM_ADAPTER), load_adapter(MINILM_ADAPTER)
    for m in cousin.modules.values():
        m.A, m.B = m.A[:4].contiguous(), (3 * m.B[:, :4]).contiguous()
    for m in sibling.modules.values():
        m.B = 1.1 * m.B
    write_peft_lora(cousin, root / "cousin")
    write_peft_lora(sibling, root / "sibling")
    pack([MINILM_ADAPTER, root / "cousin"], root / "coll", FAST, names=["real", "cousin"], quality=CLOSE)
    add(root / "coll", [root / "sibling"], names=["coded"], quality=BANK_ONLY)
    for m in sibling.modules.values():
        m.B = -0.5 * m.B
    write_peft_lora(sibling, root / "sibling2")
    add(root / "coll", [root / "sibling2"], names=["coded2"], quality=BANK_ONLY)
    return Collection(root / "coll")


def held_rank(served, name) -> int:
    return max(m.r for m in served.adapter(name).modules.values())


def dense_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW of a PEFT LoRA folder by the rule every server applies: ``lora_alpha / r`` times ``B @ A``."""
    return load_adapter(folder).delta_weights()


@pytest.mark.parametrize("name", ["cousin", "coded"])
def test_a_materialized_folder_is_one_rank_alpha_equal_r_and_computes_the_held_delta(served, tmp_path, name):
    assert {served.entry("cousin").codec, served.entry("coded").codec} == {"lowrank", "bank"}
    done = served.materialize(name, tmp_path / "cache")
    config = json.loads((done.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BASE
    assert config["r"] == config["lora_alpha"] == done.rank == held_rank(served, name)
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    held = served.adapter(name).delta_weights()
    got = dense_deltas(done.path)
    assert got.keys() == held.keys()
    for module in held:
        torch.testing.assert_close(got[module], held[module], rtol=1e-4, atol=1e-6)


def test_it_equals_unpack_dense(served, tmp_path):
    done = served.materialize("real", tmp_path / "cache")
    served.unpack(["real"], tmp_path / "dense", dense=True)
    want = dense_deltas(tmp_path / "dense")
    for name, delta in dense_deltas(done.path).items():
        torch.testing.assert_close(delta, want[name], rtol=1e-4, atol=1e-6)


def test_a_rank_cap_keeps_the_best_rank_r_delta_and_says_what_it_lost(served, tmp_path):
    assert held_rank(served, "real") > 2
    done = served.materialize("real", tmp_path / "cache", max_rank=2)
    assert done.rank == 2 and set(done.capped) == set(served.adapter("real").modules)
    got = dense_deltas(done.path)
    for name, delta in served.adapter("real").delta_weights().items():
        u, s, vh = torch.linalg.svd(delta.double())
        best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart–Young, computed apart from the code under test
        torch.testing.assert_close(got[name].double(), best, rtol=1e-3, atol=1e-6)
        lost = float(s[2:].square().sum().div(s.square().sum()).sqrt())
        assert done.capped[name] == pytest.approx(lost, rel=1e-3)


def test_modules_of_lower_rank_are_zero_padded_to_the_one_rank(served, tmp_path):
    """A low-rank-held module of rank 4 among rank-8 ones: vLLM reads one r, so every module is written at it."""
    adapter = served.adapter("real")
    first = next(iter(adapter.modules.values()))
    first.A, first.B, first.scale = first.A[:3].contiguous(), first.B[:, :3].contiguous(), 2.5  # and a scale to fold
    from vbcompress.collection.materialize import uniform_rank

    padded, r, capped = uniform_rank(adapter, max_rank=None)
    assert r == 8 and not capped and {m.r for m in padded.modules.values()} == {8}
    assert {m.scale for m in padded.modules.values()} == {1.0}  # lora_alpha = r then reproduces ΔW
    torch.testing.assert_close(padded.modules[first.name].delta_weight(), first.delta_weight())


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(served, tmp_path):
    cache = tmp_path / "cache"
    one = served.materialize("real", cache)
    size = sum(p.stat().st_size for p in one.path.iterdir())
    shutil.rmtree(one.path)
    budget = 2 * size + 1  # room for two folders of "real", or one and the smaller rank-4 cousin
    a = served.materialize("real", cache, cache_bytes=budget)
    b = served.materialize("cousin", cache, cache_bytes=budget)
    again = served.materialize("real", cache, cache_bytes=budget)  # a hit: now the most recently used
    assert again.hit and again.path == a.path and not b.hit
    os.utime(b.path, (1, 1))  # make the order certain on coarse-mtime file systems
    c = served.materialize("real", cache, base_model="served-as", cache_bytes=budget)  # a third folder: one must go
    assert a.path.is_dir() and c.path.is_dir() and not b.path.exists()
    assert sum(p.stat().st_size for f in cache.iterdir() if f.is_dir() for p in f.iterdir()) <= budget
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def _materialize_in_child(args):
    path, name, cache = args
    done = Collection(path).materialize(name, cache, cache_bytes=1)  # a cache too small for anything: constant eviction
    return done.name, done.rank


@pytest.mark.slow
def test_concurrent_processes_never_see_half_a_folder(served, tmp_path):
    cache = tmp_path / "cache"
    jobs = [(str(served.path), name, str(cache)) for name in ["real", "cousin"] * 6]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_materialize_in_child, jobs)
    assert sorted(set(results)) == [("cousin", held_rank(served, "cousin")), ("real", held_rank(served, "real"))]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    done = served.materialize("real", cache)
    assert dense_deltas(done.path).keys() == served.adapter("real").modules.keys()


def test_an_adapter_re_added_under_the_same_name_gets_a_new_folder_and_id(served, tmp_path):
    coll = tmp_path / "c"
    shutil.copytree(served.path, coll)
    before = Collection(coll).materialize("cousin", tmp_path / "cache")
    remove(coll, ["cousin"])
    other = load_adapter(MINILM_ADAPTER)
    for m in other.modules.values():
        m.B = -m.B
    write_peft_lora(other, tmp_path / "other")
    add(coll, [tmp_path / "other"], names=["cousin"], quality=BANK_ONLY)  # other weights, same name
    after = Collection(coll).materialize("cousin", tmp_path / "cache")
    assert after.path != before.path and after.int_id != before.int_id


def test_bad_settings_are_refused_in_library_terms(served, tmp_path):
    for kwargs in ({"max_rank": 0}, {"dtype": "int8"}, {"to": "kohya"}):
        with pytest.raises(SettingError):
            served.materialize("real", tmp_path / "cache", **kwargs)
    with pytest.raises(SettingError, match="no adapter 'nope'"):
        served.materialize("nope", tmp_path / "cache")


# vLLM's own code: installed --no-deps with a few small modules (README, .ci/run); skipped only outside CI.
def vllm_or_skip():
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.resolver import LoRAResolverRegistry
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"vLLM's resolver modules are not importable ({e}); .ci/run installs them")
        pytest.skip(f"vLLM not installed ({e})")
    return LoRAConfig, PEFTHelper, LoRAResolverRegistry


def test_vllm_loads_the_plugin_by_entry_point_and_its_peft_helper_accepts_the_folder(served, tmp_path, monkeypatch):
    LoRAConfig, PEFTHelper, registry = vllm_or_skip()
    import vllm.plugins

    monkeypatch.setenv("VBCOMPRESS_COLLECTION", str(served.path))
    monkeypatch.setenv("VBCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VBCOMPRESS_MAX_LORA_RANK", "8")
    monkeypatch.setenv("VLLM_PLUGINS", "vbcompress")
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setattr(registry, "resolvers", {})
    vllm.plugins.load_general_plugins()
    resolver = registry.get_resolver("vbcompress")

    request = asyncio.run(resolver.resolve_lora(BASE, "real"))
    assert request.lora_name == "real" and request.lora_int_id > 0
    helper = PEFTHelper.from_local_dir(request.lora_path, max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=8))
    assert helper.r == held_rank(served, "real") <= 8 and helper.vllm_lora_scaling_factor == 1.0
    served.unpack(["real"], tmp_path / "dense", dense=True)
    want = dense_deltas(tmp_path / "dense")
    for name, delta in dense_deltas(Path(request.lora_path)).items():
        torch.testing.assert_close(delta, want[name], rtol=1e-4, atol=1e-6)

    assert asyncio.run(resolver.resolve_lora(BASE, "not-held")) is None
    assert asyncio.run(resolver.resolve_lora("some/other-base", "real")) is None


def test_a_rank_above_the_server_cap_is_truncated_to_load(served, tmp_path):
    LoRAConfig, PEFTHelper, _ = vllm_or_skip()
    from vbcompress.vllm_plugin import CollectionResolver

    resolver = CollectionResolver(served.path, tmp_path / "cache", max_rank=1)
    request = asyncio.run(resolver.resolve_lora(BASE, "real"))
    PEFTHelper.from_local_dir(request.lora_path, max_position_embeddings=None).validate_legal(LoRAConfig(max_lora_rank=1))


def test_the_plugin_is_silent_without_a_collection_and_loud_with_a_wrong_one(tmp_path):
    from vbcompress.errors import FormatError
    from vbcompress.vllm_plugin import resolver_from_env

    assert resolver_from_env({}) is None
    with pytest.raises(FormatError):
        resolver_from_env({"VBCOMPRESS_COLLECTION": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="vLLM accepts"):
        resolver_from_env({"VBCOMPRESS_COLLECTION": str(tmp_path), "VBCOMPRESS_MAX_LORA_RANK": "12"})


def adapter_bytes(model, name: str) -> int:
    """Bytes of the tensors one adapter adds to a PEFT model (logits, compact codes), bank excluded."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    own = [t for n, t in tensors if "vector_bank" not in n and (n.endswith(f".{name}") or f"_compact_{name}_" in n)]
    return sum(t.numel() * t.element_size() for t in own)


def test_a_compact_peft_load_gives_peft_outputs_in_a_fraction_of_the_memory(served, minilm):
    _, fresh, batch = minilm
    names = ["coded", "coded2"]
    plain = served.load_peft(fresh(), names).eval()
    compact = served.load_peft(fresh(), names, compact=True).eval()
    assert compact.base_model.vblora_vector_bank["coded"] is compact.base_model.vblora_vector_bank["coded2"]
    for name in (*names, names[0]):
        plain.set_adapter(name)
        compact.set_adapter(name)
        with torch.no_grad():
            want, got = plain(**batch).last_hidden_state, compact(**batch).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    full, small = adapter_bytes(plain, "coded"), adapter_bytes(compact, "coded")
    n, k = served.manifest.settings["num_vectors"], served.topk
    assert 0 < small and full / small > n / (2 * k)  # N logits against k logits and k indices per sub-vector


@pytest.mark.slow
def test_compact_load_on_gemma_gives_peft_logits(gemma_base, tmp_path):
    """The same on the real causal base: two Gemma 3 270M adapters as bank codes, PEFT's VB-LoRA layer against
    the compact one, next-token logits on a sentence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ["attn-r4", "attn-r4-seed123"]
    sources = [ADAPTERS / f"gemma3-270m-{name}" for name in names]
    fit = FitSettings(num_vectors=256, vector_length=128, iters=2, refine_steps=10, code_refine_steps=5)
    pack(sources, tmp_path / "g", fit, names=names, quality=BANK_ONLY)
    coll = Collection(tmp_path / "g")
    tok = AutoTokenizer.from_pretrained(gemma_base)
    batch = tok(["The river rose overnight and the town woke to water in the streets."], return_tensors="pt")

    model = AutoModelForCausalLM.from_pretrained(gemma_base, torch_dtype=torch.float32).eval()
    # one read of the 1.1 GB checkpoint: load_peft wraps the model it is given, so each side gets its own copy
    plain, compact = coll.load_peft(copy.deepcopy(model), names).eval(), coll.load_peft(model, names, compact=True).eval()
    for name in names:
        plain.set_adapter(name)
        compact.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(compact(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-4)
    assert adapter_bytes(plain, names[0]) > 20 * adapter_bytes(compact, names[0])
