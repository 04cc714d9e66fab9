"""The typed errors users can meet; every message names the problem and the way out."""

from __future__ import annotations


class PhimlxError(Exception):
    """Base class of every error phimlx raises on purpose."""


class GGUFError(PhimlxError, ValueError):
    """A GGUF file is malformed, truncated, or describes a model phimlx cannot run."""


class UnsupportedModelError(GGUFError):
    """The file is a valid GGUF, but its architecture or a tensor type is not supported."""


class ContextLengthError(PhimlxError, ValueError):
    """A prompt (plus what must be generated) does not fit in the model's context."""


class BackendUnavailableError(PhimlxError, RuntimeError):
    """The requested backend cannot run on this machine (the message says why and how to fix)."""


class ModelNotFoundError(PhimlxError, FileNotFoundError):
    """A model file could not be found locally, in the cache, or on the hub."""


class PromptCacheError(PhimlxError, ValueError):
    """A saved prompt cache is missing, damaged, or was made for another model or backend."""


class ConstraintError(PhimlxError, ValueError):
    """A JSON schema, regex or grammar given to constrain the output is invalid, or the
    library that enforces it (llguidance) is missing."""
