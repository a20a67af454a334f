"""Regenerate examples/text/{calibration,heldout}.txt: English sentences from Python stdlib docstrings.

Offline and deterministic. Calibration and held-out sentences come from disjoint sets of modules.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

CALIBRATION_MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "email",
    "functools",
    "http.client",
    "logging",
    "os",
    "pathlib",
    "random",
    "re",
    "socket",
    "sqlite3",
    "subprocess",
    "threading",
    "unittest",
    "urllib.request",
]
HELDOUT_MODULES = [
    "json",
    "itertools",
    "shutil",
    "tarfile",
    "textwrap",
    "typing",
    "zipfile",
    "heapq",
    "statistics",
    "string",
    "tempfile",
    "difflib",
]


def sentences(module_names: list[str]) -> list[str]:
    out, seen = [], set()
    for name in module_names:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""] + [inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items()) if callable(obj)]
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for s in re.split(r"(?<=[.!?])\s+", text):
                if (
                    50 <= len(s) <= 200
                    and s[0].isupper()
                    and s.endswith(".")
                    and not re.search(r"[>{}\[\]=_`|]|\.\.\.|::", s)
                    and s not in seen
                ):
                    seen.add(s)
                    out.append(s)
    return out


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "text"
    root.mkdir(parents=True, exist_ok=True)
    (root / "calibration.txt").write_text("\n".join(sentences(CALIBRATION_MODULES)[:512]) + "\n")
    (root / "heldout.txt").write_text("\n".join(sentences(HELDOUT_MODULES)[:160]) + "\n")


if __name__ == "__main__":
    main()
