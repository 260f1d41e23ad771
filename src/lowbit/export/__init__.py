"""Export lowbit models to other runtimes' file formats (the layer above ``lowbit.model``).

``lowbit.export(model_or_checkpoint, "gguf", path)`` writes a GGUF file llama.cpp runs,
carrying lowbit's quantized codes unchanged where a GGUF block type holds them
(``lowbit.export.to_gguf``). The module itself is callable, so ``lowbit.export`` is both this
package and the function.
"""

from __future__ import annotations

import os
import sys
import types

from lowbit.export.gguf_weights import ExportError, UnsupportedSchemeError

__all__ = ["FORMATS", "ExportError", "UnsupportedSchemeError", "export"]

FORMATS = ("gguf",)


def export(model, to: str, path: str | os.PathLike, *, overwrite: bool = False, **options):
    """Write ``model`` (``nn.Module``, checkpoint folder, bundled name...) to ``path`` in
    format ``to`` (``"gguf"``: options of ``lowbit.export.to_gguf.export_gguf``); returns a
    report of what was written."""
    if str(to).lower() not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; lowbit exports to {', '.join(FORMATS)}")
    from lowbit.export.to_gguf import export_gguf

    return export_gguf(model, path, overwrite=overwrite, **options)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
