"""Write a model (float, or quantized by lowbit) as a GGUF file llama.cpp runs.

Quantized layers keep their own codes (``gguf_weights.carry_codes``); float weights are
written as F32 / F16, or rounded to a block type like llama.cpp's quantizer
(``float_type``). The file is written under a temporary name beside the target and renamed
when complete, so an interrupted export never leaves a partial file under the final name.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowbit.export import gguf_blocks as blocks
from lowbit.export import gguf_kquants as kquants
from lowbit.export import gguf_model
from lowbit.export.gguf_vocab import add_tokenizer, source_pre_tokenizer
from lowbit.export.gguf_weights import ExportError
from lowbit.export.hf_checkpoint import load_with_tokenizer
from lowbit.model import gguf_mixes
from lowbit.model.recipe import gguf_kind
from lowbit.model.serialization import remove_stale_temps

TYPES = blocks.FLOAT_TYPES + tuple(blocks.BLOCK_TYPES) + tuple(kquants.KQUANTS)
#: ``embedding_type`` choices: a type, or ``auto`` (``embedding_choice``)
EMBEDDING_TYPES = ("auto",) + TYPES
#: GGUF ``general.file_type`` (llama.cpp's LLAMA_FTYPE) of the dominant weight type
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
              "q5_1": "MOSTLY_Q5_1", "q6_k": "MOSTLY_Q6_K", "q5_k": "MOSTLY_Q5_K_M",
              "q4_k": "MOSTLY_Q4_K_M", "q3_k": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K",
              "iq4_nl": "MOSTLY_IQ4_NL"}


TIED_NOTE = "; token_embd holds the quantized head's codes (tied)"


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote."""

    path: Path
    architecture: str
    file_bytes: int
    parameters: int  # values in all tensors
    types: dict[str, int] = field(default_factory=dict)  # GGUF type -> number of tensors
    carried: int = 0  # tensors holding lowbit's own codes, unchanged
    tokenizer_pre: str | None = None
    shared_head: bool = False  # token_embd holds the quantized head's codes (tied)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / self.parameters

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t.upper()}" for t, n in sorted(self.types.items()))
        return (f"{self.path}: {self.architecture}, {self.file_bytes / 2**20:.1f} MiB, "
                f"{self.bits_per_weight:.2f} bits/weight ({types}; {self.carried} carry "
                f"lowbit's codes unchanged{TIED_NOTE if self.shared_head else ''}; "
                f"pre-tokenizer {self.tokenizer_pre})")


def _check_type(name: str, what: str) -> str:
    name = name.lower()
    if name not in TYPES:
        raise ExportError(f"unknown GGUF {what} {name!r}; use one of {', '.join(TYPES)}")
    return name


def _recipe_kind(model: nn.Module) -> str | None:
    """The llama.cpp type or mix of the ``gguf:`` recipe ``model`` was quantized with."""
    recipe = getattr(model, "lowbit_recipe", None)
    return gguf_kind(recipe) if recipe is not None else None


def embedding_choice(model: nn.Module, embedding_type: str) -> tuple[str, bool]:
    """(type of ``token_embd``, whether it carries the quantized head's codes). ``auto``
    writes what llama-quantize writes: a tied embedding shares the quantized head's codes
    (exactly lowbit's embedding after a ``gguf:`` recipe, which ties them; otherwise the
    file's lookup differs by the head's rounding); a ``gguf:`` recipe's embedding otherwise
    gets llama.cpp's type for it (the output type when tied, the file's main type when not);
    else F16."""
    if embedding_type != "auto":
        return embedding_type, False
    if gguf_model.shares_head(model):
        return "f16", True
    kind = _recipe_kind(model)
    if kind is None:
        return "f16", False
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return (gguf_mixes.output_type(kind) if tied else gguf_mixes.default_type(kind)), False


def _file_type(model: nn.Module, dominant: str) -> str:
    """llama.cpp's ``general.file_type`` name: the recipe's mix, else the dominant type's."""
    kind = _recipe_kind(model)
    if kind is not None and gguf_mixes.is_mix(kind):
        return f"MOSTLY_{kind.upper()}"
    return FILE_TYPES[dominant]


def _source_spec(model: nn.Module) -> str | None:
    spec = getattr(model, "lowbit_spec", None)
    return spec if isinstance(spec, str) else None


def export_gguf(model, path: str | os.PathLike, *, overwrite: bool = False,
                float_type: str = "f16", embedding_type: str = "auto", tokenizer=None,
                tokenizer_pre: str | None = None) -> ExportReport:
    """Write ``model`` (an ``nn.Module``, lowbit checkpoint folder, bundled name, HF folder or
    .gguf) to GGUF file ``path``. ``float_type``: type of unquantized linear weights (f32,
    f16, or a llama.cpp type, rounded); ``embedding_type``: type of the token embedding, or
    ``auto`` (``embedding_choice``: llama-quantize's layout); ``tokenizer_pre``: llama.cpp
    pre-tokenizer name (default: the source GGUF's, else read off ``tokenizer.json``)."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    float_type = _check_type(float_type, "type")
    if embedding_type != "auto":
        embedding_type = _check_type(embedding_type, "embedding type")
    target = Path(path)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; choose another name or pass "
                          "overwrite=True (CLI: --overwrite)")
    if target.is_dir():
        raise ExportError(f"{target} is a folder; pass a file name ending in .gguf")
    model, tokenizer = load_with_tokenizer(model, tokenizer)
    arch, config = gguf_model.architecture(model)
    embedding_type, share_head = embedding_choice(model, embedding_type)
    tensors = list(gguf_model.tensors(model, arch, config, float_type, embedding_type,
                                      share_head))
    spec = _source_spec(model)
    pre = tokenizer_pre or source_pre_tokenizer(spec)

    weight_types = collections.Counter()
    for t in tensors:
        if t.data.ndim == 2 and not t.name.startswith("token_embd"):
            weight_types[t.type] += int(t.data.shape[0])
    dominant = weight_types.most_common(1)[0][0] if weight_types else "f32"

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(tmp, arch)
    try:
        writer.add_name(Path(spec).name if spec and not spec.startswith("<") else arch)
        writer.add_file_type(getattr(LlamaFileType, _file_type(model, dominant)))
        writer.add_quantization_version(GGML_QUANT_VERSION)
        recipe = getattr(model, "lowbit_recipe", None)
        writer.add_string("general.quantized_by", "lowbit")
        if recipe is not None:
            writer.add_string("lowbit.recipe", recipe.name)
        gguf_model.add_hparams(writer, config)
        pre = add_tokenizer(writer, tokenizer, config.vocab_size, pre)
        for t in tensors:
            if t.type in blocks.FLOAT_TYPES:
                writer.add_tensor(t.name, t.data)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=blocks.ggml_type(t.type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if target.exists() and not overwrite:
            raise ExportError(f"{target} appeared while exporting; choose another name or "
                              "pass overwrite=True")
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportReport(
        target, arch, target.stat().st_size,
        sum(int(t.data.size) if t.type in blocks.FLOAT_TYPES else _values(t) for t in tensors),
        dict(collections.Counter(t.type for t in tensors)),
        sum(t.carried for t in tensors), pre, share_head)


def _values(t: gguf_model.Tensor) -> int:
    from gguf import GGML_QUANT_SIZES

    rows, nbytes = t.data.shape
    values, size = GGML_QUANT_SIZES[blocks.ggml_type(t.type)]
    return rows * nbytes // size * values
