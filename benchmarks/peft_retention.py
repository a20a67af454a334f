"""KL retention of adapters as PEFT itself loads them: an independent check of what a collection states.

Loads the base with transformers, each reference adapter and each candidate with ``PeftModel.from_pretrained``
(a LoRA, a VB-LoRA that ``vbcompress unpack`` wrote, or a dense ``unpack --dense``), and computes
``1 − KL(ref‖cand) / KL(ref‖base)`` over every real token of the first N lines of a text file (none of vbcompress's
own model or retention code runs here).

Usage: python benchmarks/peft_retention.py BASE TEXT REF=CAND [REF=CAND ...] [--lines 48] [--max-length 64]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def kl(t: torch.Tensor, x: torch.Tensor) -> float:
    """KL(t‖x) summed over rows of log-probabilities."""
    return float((t.exp() * (t - x)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("text")
    ap.add_argument("pairs", nargs="+", help="REFERENCE=CANDIDATE adapter folders")
    ap.add_argument("--lines", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(args.text, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()][: args.lines]
    tok = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32).eval()

    def log_probs(model) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(lines), 16):
                batch = tok(lines[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
                out.append(torch.log_softmax(model(**batch).logits, -1)[batch["attention_mask"].bool()])
        return torch.cat(out)

    b = log_probs(base)
    for pair in args.pairs:
        ref, cand = pair.split("=", 1)
        t = log_probs(PeftModel.from_pretrained(copy.deepcopy(base), ref).eval())
        c = log_probs(PeftModel.from_pretrained(copy.deepcopy(base), cand).eval())
        kept = 1 - kl(t, c) / kl(t, b)
        print(json.dumps({"reference": ref, "candidate": cand, "kl_retention": round(kept, 4), "tokens": len(t)}))


if __name__ == "__main__":
    main()
