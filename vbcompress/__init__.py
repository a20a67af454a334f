"""vbcompress: shrink trained LoRA adapters into PEFT's VB-LoRA vector-bank format, and back.

The public API is imported on first use (``vbcompress.lora2vb``, ``from vbcompress import pack``), so that
``import vbcompress`` and the command line's ``--help`` do not pay for torch.
"""

from __future__ import annotations

import importlib
import sys
import types

from .version import __version__  # noqa: F401  (eager: the one attribute --version needs)

_API = {
    "Adapter": "adapter",
    "LoraModule": "adapter",
    "VectorBank": "codec.layout",
    "lora2vb": "compress",
    "to_lora": "dense",
    "FormatError": "errors",
    "SettingError": "errors",
    "ShapeError": "errors",
    "VBCompressError": "errors",
    "evaluate": "evaluate",
    "load_adapter": "formats",
    "write_peft_lora": "formats",
    "write_vblora": "formats",
    "inspect_adapter": "inspection",
    "merge": "merge",
    "CalibrationSettings": "settings",
    "FitSettings": "settings",
    "MergeSettings": "settings",
    "OutputSettings": "settings",
    "RankSettings": "settings",
    "QualitySettings": "settings",
    "Collection": "collection",
    "pack": "collection",
    "add": "collection",
    "remove": "collection",
}
__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'vbcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule binds it on the package: `merge` and `evaluate` must stay the functions.
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
