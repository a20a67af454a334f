"""vbcompress: shrink trained LoRA adapters into PEFT's VB-LoRA vector-bank format, and back."""

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule, VectorBank
from .errors import FormatError, ShapeError, VBCompressError
from .formats import load_adapter, write_peft_lora, write_vblora

__all__ = [
    "Adapter",
    "FormatError",
    "LoraModule",
    "ShapeError",
    "VBCompressError",
    "VectorBank",
    "__version__",
    "load_adapter",
    "write_peft_lora",
    "write_vblora",
]
