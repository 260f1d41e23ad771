"""Write a decoder LLM (float, or quantized by lowbit) as an ONNX model ONNX Runtime runs.

The output is a folder: ``model.onnx`` (its weights in ``model.onnx.data`` beside it when
they pass ``EXTERNAL_BYTES``: protobuf files stop at 2 GiB), the Hugging Face
``config.json`` and the tokenizer's files. The graph (``onnx_decoder``) takes
``input_ids``, ``attention_mask``, ``position_ids`` and the KV cache
(``past_key_values.{i}.key/value``) and returns ``logits`` and ``present.{i}.key/value``,
so it generates token by token; ``generate`` below is a greedy loop over it.

lowbit's quantized layers keep their codes (``onnx_graph``): weight-only 2/4/8-bit ->
ORT's ``com.microsoft.MatMulNBits``; W8A8 -> ``MatMulInteger`` with lowbit's per-token
int8 activation codes computed in the graph (``activations="ort-dynamic"``: ONNX
``DynamicQuantizeLinear``, per-tensor uint8, which ORT fuses but which is not lowbit's
arithmetic); a Hadamard-rotated layer -> a MatMul by its Hadamard matrix first.
``accuracy_level`` is MatMulNBits' attribute: 0 multiplies in float32, as lowbit does; 4
lets ORT quantize the activations to int8 per block (not lowbit's numbers). The default
(None) is 0 for 2- and 4-bit layers and 4 for 8-bit ones, whose float path in ORT's CPU
kernel is a slow fallback (``onnx_graph.accuracy_for``); pass 0 for lowbit's numbers
everywhere.
The folder is built under a temporary name and swapped in when complete
(``serialization.swap_in``), so an interrupted export leaves nothing under the final name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit.export.gguf_weights import ExportError
from lowbit.export.onnx_folder import DATA, EXTERNAL_BYTES, MODEL, check_target, write_folder
from lowbit.export.onnx_graph import ACTIVATIONS

__all__ = ["DATA", "EXTERNAL_BYTES", "MODEL", "check_target", "export_onnx"]


@dataclass
class OnnxReport:
    """What ``export_onnx`` wrote."""

    path: Path
    onnx_bytes: int  # model.onnx (+ model.onnx.data)
    folder_bytes: int
    carried: int  # quantized layers holding lowbit's codes unchanged
    ops: dict[str, int] = field(default_factory=dict)  # node type -> count
    float_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        quantized = {k: v for k, v in self.ops.items()
                     if k in ("com.microsoft.MatMulNBits", "MatMulInteger")}
        kinds = ", ".join(f"{n} {k.rpartition('.')[2]}" for k, n in sorted(quantized.items()))
        text = (f"{self.path}: ONNX decoder with KV cache, {self.onnx_bytes / 2**20:.1f} MiB; "
                f"{self.carried} layers carry lowbit's codes unchanged"
                f"{f' ({kinds})' if kinds else ''}; {len(self.float_layers)} float linears")
        return "\n  ".join([text, *self.notes])


def _require():
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'lowbit[onnx]' "
                          "(onnx, and onnxruntime to run the file)") from exc


def _check_options(accuracy_level: int | None, activations: str) -> None:
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ExportError("accuracy_level must be 0-4 (MatMulNBits) or None (per bit width), "
                          f"got {accuracy_level!r}")
    if activations not in ACTIVATIONS:
        raise ExportError(f"activations must be one of {', '.join(ACTIVATIONS)}, "
                          f"got {activations!r}")


def export_onnx(model, path: str | os.PathLike, *, overwrite: bool = False, tokenizer=None,
                accuracy_level: int | None = None,
                activations: str = "per-token", example_inputs=None) -> OnnxReport:
    """Write ``model`` (an ``nn.Module``, lowbit checkpoint folder or bundled name; a
    Llama-family decoder, float or quantized by lowbit) as an ONNX folder at ``path``.
    ``accuracy_level``: MatMulNBits' compute type (0: float32 as lowbit; 4: int8
    activations; None: 0 for 2/4 bits, 4 for 8 bits); ``activations``: W8A8 activation
    codes, ``"per-token"`` (lowbit's) or ``"ort-dynamic"`` (ONNX DynamicQuantizeLinear, one
    scale per tensor). Other models (CNNs, encoders: float, or quantized with int8 weights and
    static activations, e.g. ``w8a8-static``) go to ``onnx_qdq.export_qdq`` as static int8
    QDQ; ``example_inputs`` traces a model that is not a Hugging Face text model."""
    _require()
    from lowbit.export.onnx_decoder import decoder_model

    _check_options(accuracy_level, activations)
    target = check_target(path, overwrite)
    from lowbit.export.onnx_qdq import export_qdq, open_model

    model, tokenizer, qdq = open_model(model, tokenizer, example_inputs)
    if qdq:
        return export_qdq(model, target, overwrite=overwrite, tokenizer=tokenizer,
                          example_inputs=example_inputs)
    with torch.no_grad():
        proto, facts, ops = decoder_model(model, accuracy_level=accuracy_level,
                                          activations=activations)
    recipe = getattr(model, "lowbit_recipe", None)
    meta = {"producer": "lowbit", "recipe": getattr(recipe, "name", None) or "float",
            "num_layers": facts.layers, "num_kv_heads": facts.kv_heads,
            "head_dim": facts.head_dim}
    for key, value in meta.items():
        proto.metadata_props.add(key=f"lowbit.{key}", value=str(value))

    onnx_bytes = write_folder(proto, target, overwrite, model, tokenizer)
    notes = []
    levels = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    if any(levels):
        notes.append(f"MatMulNBits accuracy_level {max(levels)} on "
                     f"{'8-bit layers' if accuracy_level is None else 'every layer'}: ORT "
                     "quantizes their activations to int8 per block, so results differ "
                     "slightly from lowbit's float32 products (accuracy_level=0: exact, slower)")
    if ops.get("DynamicQuantizeLinear"):
        notes.append("W8A8 activations: one uint8 scale per tensor (DynamicQuantizeLinear), "
                     "not lowbit's int8 scale per token")
    return OnnxReport(target, onnx_bytes,
                      sum(f.stat().st_size for f in target.iterdir() if f.is_file()),
                      len(facts.carried), dict(ops), facts.float_linears, notes)


# -- running the folder with ONNX Runtime ----------------------------------------------
def session(path: str | os.PathLike, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the exported folder's model (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(Path(path) / MODEL), opts,
                                providers=["CPUExecutionProvider"])


def empty_cache(sess, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length ``past_key_values`` feeds for a prompt."""
    feeds = {}
    for arg in sess.get_inputs():
        if arg.name.startswith("past_key_values."):
            _, heads, _, dim = arg.shape
            feeds[arg.name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    return feeds


def step(sess, ids: np.ndarray, cache: dict[str, np.ndarray]):
    """One forward over ``ids`` [batch, seq] after ``cache``: (logits, next cache)."""
    past = next(iter(cache.values())).shape[2]
    batch, seq = ids.shape
    feeds = {"input_ids": ids.astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
             "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
             **cache}
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, feeds), strict=True))
    cache = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items()
             if n.startswith("present.")}
    return out["logits"], cache


def generate(sess, ids, steps: int) -> list[int]:
    """Greedy continuation of the 1-D prompt ``ids``: ``steps`` new token ids, one forward
    per token through the KV cache."""
    prompt = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    logits, cache = step(sess, prompt, empty_cache(sess))
    out = []
    for _ in range(steps):
        out.append(int(logits[0, -1].argmax()))
        if len(out) == steps:
            break
        logits, cache = step(sess, np.array([[out[-1]]]), cache)
    return out
