"""vbcompress: shrink trained LoRA adapters into PEFT's VB-LoRA vector-bank format, and back."""

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule, VectorBank
from .compress import lora2vb
from .dense import to_lora
from .errors import FormatError, ShapeError, VBCompressError
from .evaluate import evaluate
from .formats import load_adapter, write_peft_lora, write_vblora
from .merge import merge
from .report import inspect_adapter

__all__ = [
    "Adapter",
    "FormatError",
    "LoraModule",
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
