"""Export lowbit models to other runtimes' file formats (the layer above ``lowbit.model``).

``lowbit.export(model_or_checkpoint, to, path)`` carries lowbit's quantized codes unchanged
into another runtime's format, one module per format:

- ``"gguf"``: a GGUF file llama.cpp runs (``to_gguf``);
- ``"compressed-tensors"``: a Hugging Face folder transformers and vLLM load
  (``to_compressed_tensors``);
- ``"gptq"``: a GPTQ ``gptq_v2`` folder for GPTQModel / vLLM (``to_gptq``);
- ``"onnx"``: an ONNX Runtime folder (MatMulNBits / MatMulInteger, KV cache; ``to_onnx``).
A scheme a format cannot hold is refused with ``UnsupportedSchemeError`` naming the nearest
recipe that exports. The module itself is callable, so ``lowbit.export`` is both this
package and the function.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

from lowbit.export.gguf_weights import ExportError, UnsupportedSchemeError

__all__ = ["FORMATS", "ExportError", "UnsupportedSchemeError", "export"]

#: format -> (module, function) that writes it; imported on use (gguf, compressed-tensors
#: and transformers stay optional)
WRITERS = {"gguf": ("lowbit.export.to_gguf", "export_gguf"),
           "compressed-tensors": ("lowbit.export.to_compressed_tensors",
                                  "export_compressed_tensors"),
           "gptq": ("lowbit.export.to_gptq", "export_gptq"),
           "onnx": ("lowbit.export.to_onnx", "export_onnx")}
FORMATS = tuple(WRITERS)


def export(model, to: str, path: str | os.PathLike, *, overwrite: bool = False, **options):
    """Write ``model`` (``nn.Module``, checkpoint folder, bundled name...) to ``path`` in
    format ``to``; ``options`` are the writer's (``WRITERS``: e.g. ``float_type`` for GGUF,
    ``dtype`` for the Hugging Face folders). Returns a report of what was written."""
    if str(to).lower() not in WRITERS:
        raise ExportError(f"unknown export format {to!r}; lowbit exports to {', '.join(FORMATS)}")
    module, name = WRITERS[str(to).lower()]
    writer = getattr(importlib.import_module(module), name)
    return writer(model, path, overwrite=overwrite, **options)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
