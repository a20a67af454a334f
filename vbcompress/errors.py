"""User-facing error types. The library raises these; the CLI turns them into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class VBCompressError(Exception):
    """A problem with the user's input, reported as ``<where>: <problem>``."""

    def __init__(self, where: str | Path | None, problem: str):
        self.where = str(where) if where is not None else None
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)


class FormatError(VBCompressError):
    """A file that cannot be read as an adapter: corrupt, truncated, unknown keys, bad config."""


class ShapeError(VBCompressError):
    """Tensors whose shapes do not fit together (A/B rank, bank tiling, base weights)."""


class HubError(VBCompressError):
    """The Hugging Face Hub could not give what was asked for."""
