"""The model card (README.md) written next to every compressed adapter, so the folder is ready to publish."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from .results import CompressReport
from .units import fmt_bytes
from .version import __version__

# Only these are valid `base_model` values on the Hub; a local path would be rejected (and would leak it).
HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
LICENSE_KEYS = ("license", "license_name", "license_link")


def source_metadata(folder: str | Path) -> dict:
    """The YAML front matter of the source adapter's README.md, or {} when there is none or it is broken."""
    from huggingface_hub.repocard import metadata_load

    card = Path(folder) / "README.md" if Path(folder).is_dir() else Path(folder).parent / "README.md"
    try:
        return (metadata_load(card) or {}) if card.is_file() else {}
    except Exception:  # a malformed card upstream must not stop the compression
        return {}


def model_card(
    report: CompressReport, *, base_model: str | None, task_type: str | None, source_meta: dict | None = None, repo_id: str | None = None
) -> str:
    """README.md for a ``lora2vb`` output: Hub metadata, what was kept (sizes, ΔW error, the SVD figure at the
    same size, retention if calibrated) and how to load it with PEFT."""
    from huggingface_hub import ModelCardData

    source = asdict(report.hub_source) if report.hub_source else {}
    meta = {k: v for k, v in (source_meta or {}).items() if k in LICENSE_KEYS}
    on_hub = base_model if base_model and HUB_MODEL_ID.match(base_model) else None
    data = ModelCardData(
        base_model=on_hub,
        library_name="peft",
        tags=["vblora", "vbcompress", "peft"] + ([f"base_model:adapter:{on_hub}"] if on_hub else []),
        **meta,
        **({"source_adapter": source["repo"], "source_revision": source["commit"]} if source else {}),
    )
    fit, b, svd = report.fit, report.bytes, report.svd_baseline
    name = source.get("ref") or Path(report.source).name
    rows = [
        ("Size", f"{fmt_bytes(b.vb)}: {b.ratio:.1%} of the source LoRA at fp16 ({fmt_bytes(b.source_fp16)})"),
        (
            "Vector bank",
            f"{fit.num_vectors} vectors × {fit.vector_length} ({report.output.bank_dtype}), top-{fit.topk} mixtures, rank {fit.rank}",
        ),
        ("ΔW error", f"{fmt_error(report.total_rel_error)} (relative Frobenius error of the weight updates, all modules)"),
        ("SVD truncation, same size", f"rank {svd.rank}: ΔW error {svd.rel_error:.4f}"),
    ]
    cal = report.calibration
    if cal and cal.retention_after and cal.retention_before:
        before, after = cal.retention_before.headline, cal.retention_after.headline
        what = "KL retention (next-token distributions)" if cal.retention_after.kl_retention is not None else "Effect retention"
        rows.append(
            (
                what,
                f"{fmt_error(before, '.3f')} (weight fit) → {fmt_error(after, '.3f')} (calibrated), on {cal.heldout_samples} held-out inputs ({cal.data})",
            )
        )
    if b.carried:
        rows.append(("Carried", f"{fmt_bytes(b.carried)} of non-LoRA tensors (heads), as they were"))
    v = report.verdict
    verdict = (
        f"\n> **Warning — read this before using it:** {v.line}. The ΔW error says how far this adapter's weight "
        "updates are from the source's; check the behaviour on your own inputs "
        "(`vbcompress eval SOURCE THIS --base MODEL --data FILE`).\n"
        if v is not None and (v.kind == "plain" or v.keeps != "much")
        else (f"\nVerdict: {v.line}.\n" if v is not None else "")
    )
    where = repo_id or "path/to/this/folder"
    auto = AUTO_CLASS.get(task_type or "", "AutoModel")
    # A JSON string is a valid Python literal of whatever the config says: a config value cannot inject code.
    base_line = json.dumps(base_model) if base_model else '"BASE_MODEL"  # the model the source LoRA was trained on'
    provenance = (
        f"[{source['repo']}](https://huggingface.co/{source['repo']}) at revision `{source['revision']}` (commit `{source['commit']}`)"
        if source
        else f"`{name}`"
    )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
{data.to_yaml()}
---

# {name}, as a VB-LoRA vector bank
{verdict}
This adapter is the LoRA {provenance} rewritten by [vbcompress](https://pypi.org/project/vbcompress/) {__version__}
into PEFT's VB-LoRA format: every LoRA matrix is built from sub-vectors of length {fit.vector_length}, each a
top-{fit.topk} mixture of vectors from one bank shared by all layers. It was distilled from the trained
LoRA{" and calibrated on the function of base + LoRA" if cal else ""}, not trained from scratch.

| What was kept | |
|---|---|
{table}

The full report, per module, is in `vbcompress.json`.

## Use it with PEFT

```python
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained({base_line})
model = PeftModel.from_pretrained(base, {json.dumps(where)})
```

Back to a plain LoRA (exact at full rank): `vbcompress vb2lora {where} -o lora/`.
"""


def fmt_error(x: float | None, spec: str = ".4f") -> str:
    """A figure that may be undefined (an adapter whose ΔW is zero has no relative error)."""
    return "n/a" if x is None else format(x, spec)


def _front_matter(base_model: str | None, tags: list[str], extra: dict | None = None) -> str:
    from huggingface_hub import ModelCardData

    on_hub = base_model if base_model and HUB_MODEL_ID.match(base_model) else None
    data = ModelCardData(base_model=on_hub, tags=tags, **{k: v for k, v in (extra or {}).items() if k in LICENSE_KEYS})
    return f"---\n{data.to_yaml()}\n---\n"


def unpacked_card(entry, collection: str, written_as: str, task_type: str | None) -> str:
    """README.md for one adapter written by ``unpack``: where it came from, what the collection kept of it, and
    a warning first when a plain representation keeps more or it keeps little."""
    v = entry.verdict or {}
    warning = (
        f"\n> **Warning — read this before using it:** {v['line']}.\n"
        if v.get("line") and (v.get("kind") == "plain" or v.get("keeps") not in (None, "much"))
        else (f"\nVerdict: {v['line']}.\n" if v.get("line") else "")
    )
    rows = [
        (
            "Held in the collection as",
            f"{entry.held_as}: {fmt_bytes(entry.marginal_bytes)} of its own ({fmt_bytes(entry.source_fp16_bytes)} at fp16 as a LoRA)",
        ),
        ("ΔW error", f"{fmt_error(entry.rel_error)} (relative Frobenius error of the weight updates against the source)"),
    ]
    if entry.retention is not None:
        rows.append(("Retention", f"{entry.retention:.3f} of the source's effect on held-out text"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    auto = AUTO_CLASS.get(task_type or "", "AutoModel")
    base_line = json.dumps(entry.base_model) if entry.base_model else '"BASE_MODEL"'
    return f"""{_front_matter(entry.base_model, ["vbcompress", "peft", "vblora" if written_as == "VB-LoRA" else "lora"])}
# {entry.name}, unpacked from a vbcompress collection
{warning}
Written as a {written_as} adapter by [vbcompress](https://pypi.org/project/vbcompress/) {__version__} from the collection
`{Path(collection).name}`; the source was `{Path(entry.source).name}`.

| What was kept | |
|---|---|
{table}

## Use it with PEFT

```python
from peft import PeftModel
from transformers import {auto}

model = PeftModel.from_pretrained({auto}.from_pretrained({base_line}), "path/to/this/folder")
```
"""


def merged_card(base: str, adapter: str, base_meta: dict, dtype: str) -> str:
    """README.md for a ``merge`` output: the base with the adapter folded in (the base's card described the
    base alone, so it is not copied); the base's license carries over."""
    return f"""{_front_matter(base, ["vbcompress", "merge"], base_meta)}
# {Path(base).name} with {Path(adapter).name} merged in

Full weights of `{base}` with the adapter `{adapter}` folded into them (W + ΔW, computed in float32, stored as
{dtype}) by [vbcompress](https://pypi.org/project/vbcompress/) {__version__}. It loads like the base model and
needs no adapter library. The base's license applies; see the base model's own card for what it is and does.
The merge report is in `vbcompress.json`.
"""
