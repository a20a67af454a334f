"""What a collection's JSON files may hold, checked field by field on read: a collection is a folder people
download and share, so its manifest and tables are input like any adapter file.

Every name that can become a path (manifest keys, entry names, table names) matches one pattern: 1–128
letters, digits, '.', '_' or '-', starting with a letter or digit. No separator, no '..', no control
character, so no name leads outside the collection or into a terminal escape.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import FormatError, SettingError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_RANK = 1 << 16
MAX_VECTORS = 1 << 24


def check_name(name) -> str:
    """``name`` if it can name an adapter folder (see the module docstring); a SettingError otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SettingError("name", f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


class Fields:
    """Typed access to one JSON object, every problem a FormatError naming ``path`` and the field."""

    def __init__(self, data, path: Path, what: str):
        if not isinstance(data, dict):
            raise FormatError(path, f"{what} must be a JSON object, not {type(data).__name__}")
        self.data, self.path, self.what = data, path, what

    def fail(self, key: str, expected: str):
        raise FormatError(self.path, f"{self.what}: {key!r} must be {expected}, not {self.data.get(key)!r:.60}")

    def int(self, key: str, lo: int = 0, hi: int = 1 << 62, optional: bool = False):
        v = self.data.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            self.fail(key, f"an integer in [{lo}, {hi}]")
        return v

    def float(self, key: str, lo: float = 0.0, hi: float = float("inf"), optional: bool = True):
        v = self.data.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            self.fail(key, f"a number in [{lo:g}, {hi:g}]")
        return float(v)

    def str(self, key: str, optional: bool = False, pattern: re.Pattern | None = None):
        v = self.data.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str) or len(v) > 4096 or (pattern is not None and not pattern.fullmatch(v)):
            self.fail(key, "a string" + (f" matching {pattern.pattern}" if pattern else ""))
        return v

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, "true or false")
        return v

    def obj(self, key: str, optional: bool = False):
        v = self.data.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            self.fail(key, "an object")
        return v

    def list(self, key: str, optional: bool = True):
        v = self.data.get(key)
        if v is None and optional:
            return []
        if not isinstance(v, list):
            self.fail(key, "a list")
        return v


def entry_fields(name: str, data, path: Path, codecs, bits: tuple[int, ...], num_vectors: int = MAX_VECTORS) -> dict:
    """The keyword arguments of a manifest :class:`~.store.Entry`, every field checked (``bank_rows`` inside a
    bank of ``num_vectors``)."""
    f = Fields(data, path, f"entry {name!r}")
    if f.str("name") != name:
        f.fail("name", f"the entry's key {name!r}")
    codec = f.str("codec", optional=True) or "bank"
    if codec not in codecs:
        f.fail("codec", f"one of {', '.join(codecs)}")
    bit = f.int("bits", 2, 16, optional=True)
    if codec != "bank" and bit not in bits:
        f.fail("bits", f"one of {', '.join(map(str, bits))}")
    return {
        "name": name,
        "source": f.str("source"),
        "source_sha256": f.str("source_sha256", pattern=HEX64),
        "source_format": f.str("source_format"),
        "base_model": f.str("base_model", optional=True),
        "rank": f.int("rank", 1, MAX_RANK),
        "modules": f.int("modules", 0, 1 << 20),
        "rel_error": f.float("rel_error", 0.0, 1e6),
        "codes_bytes": f.int("codes_bytes"),
        "carried_bytes": f.int("carried_bytes"),
        "source_fp16_bytes": f.int("source_fp16_bytes"),
        "added_by": f.str("added_by"),
        "calibrated": f.bool("calibrated"),
        "hub_source": f.obj("hub_source", optional=True),
        "codec": codec,
        "bits": bit,
        "source_rank": f.int("source_rank", 1, MAX_RANK, optional=True),
        "retention": f.float("retention", -1e6, 1.0),
        "floor": f.str("floor", optional=True),
        "tried": f.list("tried"),
        "verdict": f.obj("verdict", optional=True),
        "codes_sha256": f.str("codes_sha256", optional=True, pattern=HEX64),
        "table_sha256": f.str("table_sha256", optional=True, pattern=HEX64),
        "per_module": f.bool("per_module"),
        "bank_rows": bank_rows(f, num_vectors),
        "vectors_bytes": f.int("vectors_bytes", optional=True) or 0,
    }


def bank_rows(f: Fields, num_vectors: int) -> list[int] | None:
    rows = f.data.get("bank_rows")
    if rows is None:
        return None
    if (
        not isinstance(rows, list)
        or len(rows) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows)
        or not 0 <= rows[0] < rows[1] <= num_vectors
    ):
        f.fail("bank_rows", f"[start, stop) inside the bank of {num_vectors} vectors")
    return rows


def check_settings(data, path: Path) -> dict:
    """The bank's settings: N, L, k within bounds (the rest is carried as it is)."""
    f = Fields(data, path, "settings")
    n = f.int("num_vectors", 1, MAX_VECTORS)
    f.int("vector_length", 1, 1 << 16)
    f.int("topk", 1, n)
    f.int("rank", 1, MAX_RANK, optional=True)
    f.str("bank_dtype", pattern=re.compile("float32|float16"))
    return data


def check_table(meta, path: Path, codec: str, expected_name: str) -> dict:
    """An adapter's ``adapter.json``: its name, rank and module table, checked against its codec."""
    f = Fields(meta, path, "adapter table")
    if f.str("name") != expected_name:
        f.fail("name", f"{expected_name!r}, the entry it belongs to")
    if (meta.get("codec") or "bank") != codec:
        f.fail("codec", f"{codec!r}, as the manifest says")
    f.int("rank", 1, MAX_RANK)
    f.bool("fan_in_fan_out")
    modules = f.list("modules", optional=False)
    width = 3 if codec == "bank" else 4
    for row in modules:
        if (
            not isinstance(row, list)
            or len(row) != width
            or not isinstance(row[0], str)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in row[1:])
        ):
            raise FormatError(
                path, f"adapter table: every module row must be [name, in, out{', rank' if width == 4 else ''}], not {row!r:.80}"
            )
    if len({row[0] for row in modules}) != len(modules):
        raise FormatError(path, "adapter table: a module is listed twice")
    return meta
