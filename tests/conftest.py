"""Shared fixtures: the real adapter corpus and MiniLM base in ../shared, and small model builders."""

from __future__ import annotations

import os
import re
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
