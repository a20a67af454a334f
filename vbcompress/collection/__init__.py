"""Collections: one vector bank shared by many LoRA adapters of one base (``pack``, ``add``, ``unpack``,
``remove``). :mod:`.store` is the format and reader, :mod:`.encode` puts adapters in, :mod:`.batch` drives
many sources at once, :mod:`.export` gets them out."""

from ..settings import FitSettings
from .batch import AddReport, Failure, Outcome, RemoveReport, add, remove
from .encode import pack
from .export import Collection, UnpackReport, inspect_collection
from .store import CollectionSummary, Entry, Manifest, is_collection
from .writes import locked, read_failures

__all__ = [
    "AddReport",
    "Collection",
    "CollectionSummary",
    "Entry",
    "Failure",
    "FitSettings",
    "Manifest",
    "Outcome",
    "RemoveReport",
    "UnpackReport",
    "add",
    "inspect_collection",
    "is_collection",
    "locked",
    "pack",
    "read_failures",
    "remove",
]
