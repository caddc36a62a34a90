"""kvgen: LLM text generation in Rust, a drop-in for transformers' `model.generate()`."""

from . import _kvgen
from .errors import (
    BackendUnavailableError,
    ContextLengthError,
    InvalidInputError,
    KvgenError,
    ModelFormatError,
    ModelNotFoundError,
    NumericalError,
    RequestCancelledError,
    TokenizerError,
    TokenOutOfRangeError,
    UnsupportedArchitectureError,
)
from .generation_config import GenerationConfig
from .generator import Generator
from .outputs import GenerateDecoderOnlyOutput
from .processing import process_logits
from .seeding import set_seed
from .tokenizer import Tokenizer

__version__ = _kvgen.__version__

__all__ = [
    "BackendUnavailableError",
    "ContextLengthError",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "Generator",
    "InvalidInputError",
    "KvgenError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NumericalError",
    "RequestCancelledError",
    "Tokenizer",
    "TokenizerError",
    "TokenOutOfRangeError",
    "UnsupportedArchitectureError",
    "process_logits",
    "set_seed",
]
