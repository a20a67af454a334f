"""Shared fixtures: the real adapter corpus and MiniLM base in ../shared, and small model builders."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VBCOMPRESS_SHARED", REPO.parent / "shared"))
ADAPTERS = SHARED / "adapters"
MINILM_BASE = SHARED / "bases" / "all-MiniLM-L6-v2"
MINILM_ADAPTER = ADAPTERS / "minilm-l6-bias-st"
EXAMPLE = REPO / "examples" / "gpt2-tigrinya-causal"


def corpus_names() -> list[str]:
    return sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir()) if ADAPTERS.is_dir() else []


def manifest_lora_params() -> dict[str, int]:
    """LoRA parameter counts per adapter, from the corpus' MANIFEST.md tables."""
    counts = {}
    for line in (ADAPTERS / "MANIFEST.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9 or not (ADAPTERS / cells[0]).is_dir():
            continue
        numbers = [c for c in cells if re.fullmatch(r"\d{1,3}(,\d{3})+", c)]
        if numbers:
            counts[cells[0]] = int(numbers[0].replace(",", ""))
    return counts


@pytest.fixture(scope="session", autouse=True)
def require_shared():
    """The corpus is test data: skip locally without it, but never let CI pass vacuously."""
    if not ADAPTERS.is_dir() or not MINILM_BASE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared test data missing at {SHARED} (set VBCOMPRESS_SHARED)")
        pytest.skip(f"shared test data missing at {SHARED}")


def skeleton_model(adapter) -> nn.Module:
    """A model with a bare layer at every adapted module path, of the right shape, for PEFT to wrap."""
    from transformers.pytorch_utils import Conv1D

    root = nn.Module()
    for name, m in adapter.modules.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        layer = Conv1D(m.out_features, m.in_features) if m.fan_in_fan_out else nn.Linear(m.in_features, m.out_features)
        parent.add_module(leaf, layer)
    return root


def peft_delta_weights(adapter_dir: Path, adapter) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT computes it (``get_delta_weight``) after loading ``adapter_dir`` on a skeleton."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type = None  # a skeleton has no generation or classification head
    model = PeftModel.from_pretrained(skeleton_model(adapter), str(adapter_dir), config=config)
    return {name: model.base_model.model.get_submodule(name).get_delta_weight("default") for name in adapter.modules}


@pytest.fixture(scope="session")
def minilm():
    """(tokenizer, fresh-model factory, batch of held-out sentences) for the MiniLM base."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM_BASE)
    batch = tok(
        [
            "The committee postponed its decision until next spring.",
            "She plays the violin better than anyone I know.",
            "Interest rates rose sharply after the announcement.",
            "A small dog barked at the passing bicycle.",
        ],
        return_tensors="pt",
        padding=True,
    )

    def fresh():
        return AutoModel.from_pretrained(MINILM_BASE).eval()

    return tok, fresh, batch


def outputs_with_delta(fresh, batch, adapter) -> torch.Tensor:
    """Hidden states of the base with ``adapter``'s ΔW added to its weights by us (no PEFT)."""
    model = fresh()
    state = model.state_dict()
    for name, m in adapter.modules.items():
        state[f"{name}.weight"] += m.delta_weight()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(**batch).last_hidden_state


def gemma_dir() -> Path:
    """Where the Gemma 3 270M base is built and reused (outside the repo); .ci/run uses the same rule."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("VBCOMPRESS_GEMMA", cache / "vbcompress" / "gemma3-270m"))


@pytest.fixture(scope="session")
def gemma_base() -> Path:
    """The real causal base (Gemma 3 270M), built once by ../shared/bases/make_gemma3_270m.sh. Locally the
    Gemma tests skip if it cannot be built; under CI they fail."""
    import subprocess

    path = gemma_dir()
    if not (path / "config.json").is_file():
        script = SHARED / "bases" / "make_gemma3_270m.sh"
        # said past pytest's capture: a silent two-minute pause reads as a hang
        sys.__stderr__.write(
            f"\nbuilding the Gemma 3 270M test base into {path} (once; about 2 minutes and 1.1 GB; VBCOMPRESS_GEMMA moves it)\n"
        )
        start = time.monotonic()
        done = script.is_file() and subprocess.run(["bash", str(script), str(path)], capture_output=True).returncode == 0
        sys.__stderr__.write(f"Gemma 3 270M {'built' if done else 'could not be built'} in {(time.monotonic() - start) / 60:.1f} min\n")
        if not done:
            if os.environ.get("CI"):
                pytest.fail(f"the Gemma 3 270M base could not be built into {path} with {script}")
            pytest.skip(f"the Gemma 3 270M base is not at {path} and could not be built with {script}")
    return path


def tiny_causal_base(root: Path, *, context: int = 32, special: bool = True) -> Path:
    """A 2-layer GPT-2 with a word-level tokenizer of 96 words (with or without pad/eos/bos) at ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(95)] + ["<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = dict(eos_token="w0", bos_token="w0", pad_token="w0") if special else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **extra).save_pretrained(root)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=context, vocab_size=96)).save_pretrained(root)
    return root


def tiny_causal_lora(base: Path, out: Path) -> Path:
    """A random rank-4 LoRA on the tiny GPT-2's attention, written by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(GPT2LMHeadModel.from_pretrained(base), config).save_pretrained(out)
    return out
