"""llmrouter provider for Hugging Face transformers models, run in-process.

The package imports no torch or transformers at import time: they load when a
provider starts. See ``docs/providers/transformers.md``.
"""

from llmrouter_transformers.provider import MODEL_ENV, TransformersOptions, TransformersProvider
from llmrouter_transformers.smollm2 import MODEL_NAME as SMOLLM2_MODEL_NAME

__all__ = ["MODEL_ENV", "SMOLLM2_MODEL_NAME", "TransformersOptions", "TransformersProvider"]
