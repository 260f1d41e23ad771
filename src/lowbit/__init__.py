"""lowbit: quantize PyTorch models and LLMs, and see what each choice costs.

Submodules load on first use, so ``import lowbit`` stays light (no transformers, onnx or
matplotlib).
"""

from __future__ import annotations

import importlib

from lowbit.version import __version__  # noqa: F401  (lowbit.__version__)

# public name -> module that defines it
_LAZY = {
    "formats": "lowbit.formats",
    "observers": "lowbit.observers",
    "data": "lowbit.data",
    "get_format": "lowbit.formats",
    "list_formats": "lowbit.formats",
    "Granularity": "lowbit.formats",
    "model": "lowbit.model",
    "nn": "lowbit.nn",
    "kernels": "lowbit.kernels",
    "algorithms": "lowbit.algorithms",
    "eval": "lowbit.eval",
    "load_model": "lowbit.model",
    "load_tokenizer": "lowbit.model",
    "save": "lowbit.model",
    "load": "lowbit.model",
    "quantize_checkpoint": "lowbit.model",
    "Recipe": "lowbit.model",
    "PRESETS": "lowbit.model",
    "evaluate": "lowbit.eval",
    "prepare_qat": "lowbit.training",
    "convert": "lowbit.training",
    "QATConfig": "lowbit.training",
    "training": "lowbit.training",
    "export": "lowbit.export",
    "generate": "lowbit.runtime.text",
}


def quantize(model, recipe="w8", calibration=None, **kwargs):
    """Quantize ``model`` in place with ``recipe`` and return it (see ``lowbit.model.pipeline``)."""
    from lowbit.model import quantize as _quantize

    return _quantize(model, recipe, calibration, **kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__ == f"lowbit.{name}" else getattr(module, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
