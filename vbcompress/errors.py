"""User-facing error types. The library raises these; the CLI turns them into one line and exit code 2.

Errors speak library terms. One that is about a setting names it in ``setting`` (the Python parameter or
settings field, e.g. ``"num_vectors"``) and writes ``{setting}`` where the message names it: the library
prints the field name, the CLI the flag it maps that field to (``--num-vectors``).
"""

from __future__ import annotations

from pathlib import Path


class VBCompressError(Exception):
    """A problem with the user's input, reported as ``<where>: <problem>``."""

    def __init__(self, where: str | Path | None, problem: str, setting: str | None = None):
        self.where = str(where) if where is not None else None
        self.problem = problem
        self.setting = setting
        super().__init__(self.render())

    def __reduce__(self):
        # Rebuilt from its parts (the default would call __init__ with the rendered message): an error raised
        # in a worker process or a Ray task arrives in the driver as the same error.
        return _rebuild, (type(self), self.where, self.problem, self.setting)

    def render(self, name_of=lambda setting: setting) -> str:
        """The one-line message, with ``{setting}`` written as ``name_of(setting)``."""
        problem = self.problem.replace("{setting}", name_of(self.setting)) if self.setting else self.problem
        return shown(f"{self.where}: {problem}" if self.where else problem)


def _rebuild(kind: type, where: str | None, problem: str, setting: str | None) -> VBCompressError:
    error = kind.__new__(kind)
    VBCompressError.__init__(error, where, problem, setting)
    return error


class FormatError(VBCompressError):
    """A file that cannot be read as an adapter: corrupt, truncated, unknown keys, bad config."""


class ShapeError(VBCompressError):
    """Tensors whose shapes do not fit together (A/B rank, bank tiling, base weights)."""


class SettingError(VBCompressError):
    """A setting out of its range or in conflict with the input; ``setting`` names it."""

    def __init__(self, setting: str, problem: str, where: str | Path | None = None):
        super().__init__(where, problem, setting=setting)


class OutputError(VBCompressError):
    """An output target that cannot be written as asked (exists, is an input, is locked)."""


class HubError(VBCompressError):
    """The Hugging Face Hub could not give what was asked for."""


class MissingExtra(SettingError):
    """An optional dependency the asked-for feature needs is not installed."""

    def __init__(self, module: str, extra: str, feature: str):
        super().__init__("base", f"{feature} needs {module}, which is not installed: pip install 'vbcompress[{extra}]'")


def requires(module: str, extra: str, feature: str):
    """Import ``module`` for ``feature``, or raise :class:`MissingExtra` naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(module, extra, feature) from None


def shown(text: str) -> str:
    """``text`` safe for one terminal line: control characters (newlines, escape sequences) written as
    escapes, so a hostile name can neither split a message nor drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def listed(items, limit: int = 6, sep: str = ", ") -> str:
    """``a, b, c, +4 more``: the first ``limit`` items of a list for a one-line message."""
    items = [str(i) for i in items]
    if not items:
        return "nothing"
    return sep.join(items[:limit]) + (f"{sep}+{len(items) - limit} more" if len(items) > limit else "")
