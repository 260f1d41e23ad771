"""Run llama.cpp's own tools on a GGUF export: greedy text, perplexity, speed, re-quantization.

The binaries come from ``scripts/build_llama_cpp.sh`` (``~/.cache/lowbit/llama.cpp/bin``) or
the folder named by ``LOWBIT_LLAMA_CPP_BIN``; ``find_tool`` returns None when absent, so
tests can skip with a reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from lowbit.export.gguf_weights import ExportError

BUILD_HINT = "build them with scripts/build_llama_cpp.sh (or set LOWBIT_LLAMA_CPP_BIN)"


class LlamaCppToolError(ExportError):
    """A llama.cpp tool is missing or failed; the message shows its output."""


def tool_dir() -> Path:
    env = os.environ.get("LOWBIT_LLAMA_CPP_BIN")
    return Path(env) if env else Path.home() / ".cache" / "lowbit" / "llama.cpp" / "bin"


def find_tool(name: str) -> Path | None:
    path = tool_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _run(name: str, args: list[str], timeout: float = 1800) -> str:
    tool = find_tool(name)
    if tool is None:
        raise LlamaCppToolError(f"llama.cpp's {name} is not in {tool_dir()}; {BUILD_HINT}")
    proc = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise LlamaCppToolError(f"{name} {' '.join(args)} failed ({proc.returncode}):\n"
                                f"{proc.stderr[-2000:]}")
    return proc.stdout + "\n" + proc.stderr if name == "llama-perplexity" else proc.stdout


def greedy_text(model: str | os.PathLike, prompt: str, n_tokens: int, threads: int = 2) -> str:
    """The text llama.cpp generates after ``prompt`` (greedy: temperature 0, no chat
    template, no extra BOS handling beyond the file's ``add_bos_token``); trailing newlines
    are dropped (llama-completion ends its output with blank lines)."""
    return _run("llama-completion", [
        "-m", str(model), "-p", prompt, "-n", str(n_tokens), "--temp", "0", "-no-cnv",
        "--no-display-prompt", "-t", str(threads), "-c", "256", "--no-warmup", "--simple-io",
        "-s", "1"]).rstrip("\n")


def perplexity(model: str | os.PathLike, text_file: str | os.PathLike, ctx: int = 512,
               chunks: int = 8, threads: int = 2) -> float:
    """``llama-perplexity -c ctx``'s PPL over the first ``chunks`` windows of ``text_file``.

    llama.cpp's logger may drop its last lines when the process exits (its singleton is never
    flushed), so the tool runs one chunk more and the running PPL printed after chunk
    ``chunks`` is read: the same number as ``--chunks chunks``'s final estimate."""
    out = _run("llama-perplexity", ["-m", str(model), "-f", str(text_file), "-c", str(ctx),
                                    "--chunks", str(chunks + 1), "-t", str(threads),
                                    "-b", str(ctx)])
    running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", out))
    if str(chunks) not in running:
        raise LlamaCppToolError(f"llama-perplexity printed no PPL after chunk {chunks} (is "
                                f"the text long enough for {chunks + 1} chunks?):\n{out[-2000:]}")
    return float(running[str(chunks)])


#: one per-chunk row of ``llama-perplexity --kl-divergence``: chunk, PPL(Q), ln(PPL(Q)/PPL(base)),
#: KL divergence, RMS of the probability change (%), same top token (%), each "value ± unc"
_KLD_ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+) ±\s+[0-9.]+\s+(-?[0-9.]+) ±\s+[0-9.]+\s+"
                      r"(-?[0-9.]+) ±\s+[0-9.]+\s+([0-9.]+) ±\s+[0-9.]+ %\s+([0-9.]+) ±", re.M)


def kl_divergence(model: str | os.PathLike, base: str | os.PathLike,
                  text_file: str | os.PathLike, base_logits: str | os.PathLike,
                  ctx: int = 512, chunks: int = 8, threads: int = 2) -> dict:
    """llama.cpp's own KL divergence of ``model`` against ``base`` (its F32 file, say):
    ``llama-perplexity --kl-divergence-base`` stores ``base``'s log-probabilities over the
    first ``chunks`` windows of ``text_file`` in ``base_logits`` (once), then
    ``--kl-divergence`` scores ``model`` on the same tokens. Returns ``ppl``, ``kld`` (mean
    over scored tokens), ``top1`` (same top token) as printed after chunk ``chunks`` (run
    with one chunk more, see ``perplexity``)."""
    base_logits = Path(base_logits)
    common = ["-c", str(ctx), "--chunks", str(chunks + 1), "-t", str(threads), "-b", str(ctx)]
    if not base_logits.exists():
        tmp = base_logits.with_name(base_logits.name + ".part")
        _run("llama-perplexity", ["-m", str(base), "-f", str(text_file),
                                  "--kl-divergence-base", str(tmp), *common])
        tmp.rename(base_logits)
    out = _run("llama-perplexity", ["-m", str(model), "--kl-divergence-base", str(base_logits),
                                    "--kl-divergence", *common])
    rows = {int(m[0]): m for m in _KLD_ROW.findall(out)}
    if chunks not in rows:
        raise LlamaCppToolError(f"llama-perplexity --kl-divergence printed no row for chunk "
                                f"{chunks}:\n{out[-2000:]}")
    row = rows[chunks]
    return {"ppl": float(row[1]), "kld": float(row[3]), "top1": float(row[5]) / 100}


def bench(model: str | os.PathLike, threads: int = 2, prompt: int = 512, gen: int = 64,
          repetitions: int = 3) -> dict:
    """``llama-bench -t threads -p prompt -n gen``: prefill and decode tokens/s, CPU name."""
    out = _run("llama-bench", ["-m", str(model), "-t", str(threads), "-p", str(prompt),
                               "-n", str(gen), "-r", str(repetitions), "-o", "json"])
    rows = json.loads(out[out.index("["):])
    result = {"cpu": rows[0].get("cpu_info", "?"), "model_size": rows[0].get("model_size")}
    for row in rows:
        key = "prefill_tps" if row.get("n_prompt") else "decode_tps"
        result[key] = float(row["avg_ts"])
        result[key.replace("tps", "sd")] = float(row.get("stddev_ts", 0.0))
    return result


def quantize(source: str | os.PathLike, target: str | os.PathLike, type_name: str,
             threads: int = 2, imatrix: str | os.PathLike | None = None) -> Path:
    """``llama-quantize [--imatrix F] source target TYPE`` (llama.cpp's own rounding and type
    mix, weighted by an importance matrix when given)."""
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    _run("llama-quantize", [*extra, str(source), str(target), type_name.upper(), str(threads)])
    return Path(target)


def importance_matrix(model: str | os.PathLike, text_file: str | os.PathLike,
                      target: str | os.PathLike, ctx: int = 512, chunks: int = -1,
                      threads: int = 2) -> Path:
    """``llama-imatrix``: llama.cpp's importance matrix (mean squared activation of each
    input of each weight) over ``chunks`` windows of ``ctx`` tokens of ``text_file``."""
    _run("llama-imatrix", ["-m", str(model), "-f", str(text_file), "-o", str(target),
                           "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)])
    return Path(target)
