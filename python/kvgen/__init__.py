"""kvgen: LLM text generation in Rust, a drop-in for transformers' `model.generate()`."""

try:
    from . import _kvgen
except ImportError as _e:
    # A build with the `torch` feature links libtorch, which lives in the torch wheel: importing
    # torch loads it (and libc10 etc.) into the process. The plain build never gets here.
    if not any(lib in str(_e) for lib in ("libtorch", "libc10")):
        raise
    try:
        import torch  # noqa: F401
    except ImportError as _torch_missing:
        raise ImportError(
            "this kvgen build includes the torch backend (cargo feature `torch`) and needs torch==2.11.0 "
            "installed: pip install torch==2.11.0 (or reinstall kvgen without the feature)"
        ) from _torch_missing

    from . import _kvgen
from .errors import (
    BackendError,
    BackendUnavailableError,
    ContextLengthError,
    InternalError,
    InvalidInputError,
    KvgenError,
    ModelFormatError,
    ModelNotFoundError,
    NumericalError,
    OutOfMemoryError,
    OverloadedError,
    RequestCancelledError,
    TokenizerError,
    TokenOutOfRangeError,
    UnsupportedArchitectureError,
)
from . import neuron  # kvgen.neuron.export / kvgen.neuron.compile (stdlib only until export runs)
from .generation_config import GenerationConfig
from .generator import Generator, compute_transition_scores
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .processing import process_logits
from .seeding import set_seed
from .tokenizer import Tokenizer

__version__ = _kvgen.__version__

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "ContextLengthError",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "compute_transition_scores",
    "GenerationConfig",
    "Generator",
    "InternalError",
    "InvalidInputError",
    "KvgenError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NumericalError",
    "OutOfMemoryError",
    "OverloadedError",
    "RequestCancelledError",
    "Tokenizer",
    "TokenizerError",
    "TokenOutOfRangeError",
    "UnsupportedArchitectureError",
    "neuron",
    "process_logits",
    "set_seed",
]
