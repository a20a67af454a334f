"""vbcompress: shrink trained LoRA adapters into PEFT's VB-LoRA vector-bank format, and back."""

from .adapter import Adapter, LoraModule, VectorBank
from .compress import lora2vb
from .dense import to_lora
from .errors import FormatError, SettingError, ShapeError, VBCompressError
from .evaluate import evaluate
from .formats import load_adapter, write_peft_lora, write_vblora
from .inspection import inspect_adapter
from .merge import merge
from .settings import CalibrationSettings, FitSettings, MergeSettings, OutputSettings, RankSettings
from .version import __version__

__all__ = [
    "Adapter",
    "CalibrationSettings",
    "FitSettings",
    "FormatError",
    "LoraModule",
    "MergeSettings",
    "OutputSettings",
    "RankSettings",
    "SettingError",
    "ShapeError",
    "VBCompressError",
    "VectorBank",
    "__version__",
    "evaluate",
    "inspect_adapter",
    "load_adapter",
    "lora2vb",
    "merge",
    "to_lora",
    "write_peft_lora",
    "write_vblora",
]
