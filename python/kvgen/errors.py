"""kvgen's exceptions. Each also derives the builtin a caller would catch (ValueError for bad input,
FileNotFoundError for missing files, MemoryError when memory cannot be reserved, RuntimeError for
numerical and backend faults)."""


class KvgenError(Exception):
    """Base of every error kvgen raises (except KeyboardInterrupt on Ctrl-C)."""


class InvalidInputError(KvgenError, ValueError):
    """A bad argument: the message names the value, the limit and the fix."""


class TokenOutOfRangeError(InvalidInputError):
    """A token id outside the model's embedding."""


class ContextLengthError(InvalidInputError):
    """Prompt plus new tokens do not fit the model's context."""


class UnsupportedArchitectureError(KvgenError, ValueError):
    """config.json names an architecture kvgen does not implement."""


class ModelFormatError(KvgenError, ValueError):
    """A model file that exists but cannot be read."""


class ModelNotFoundError(KvgenError, FileNotFoundError):
    """A model path or hub id that does not exist locally."""


class TokenizerError(KvgenError, ValueError):
    """Tokenizer files or chat templates that fail."""


class NumericalError(KvgenError, RuntimeError):
    """NaN or Inf logits reached the sampler."""


class BackendUnavailableError(KvgenError, RuntimeError):
    """The requested device/backend is not built in or cannot start."""


class BackendError(KvgenError, RuntimeError):
    """A fault inside the backend's runtime (for the torch backend: out of GPU memory, a failed kernel)."""


class InternalError(KvgenError, RuntimeError):
    """A kvgen bug; please report it."""


class RequestCancelledError(KvgenError, RuntimeError):
    """The generation was cancelled (its task was cancelled, its stream closed, its client left)."""


class OutOfMemoryError(KvgenError, MemoryError):
    """Memory for a request or a model could not be reserved; the message says how much and how to ask for less."""


class OverloadedError(KvgenError, RuntimeError):
    """The scheduler's admission queue is full; retry later (the server answers 429 with Retry-After)."""
