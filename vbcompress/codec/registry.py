"""Every codec by the name a manifest entry records."""

from __future__ import annotations

from ..errors import FormatError
from .bank import BANK
from .base import Codec
from .lowrank import LOWRANK

CODECS: dict[str, Codec] = {BANK.name: BANK, LOWRANK.name: LOWRANK}


def codec_named(name: str, where) -> Codec:
    """The codec a manifest names; a FormatError naming ``where`` for one this version does not know."""
    if name not in CODECS:
        raise FormatError(where, f"unknown codec {name!r} (this vbcompress reads {', '.join(CODECS)})")
    return CODECS[name]
