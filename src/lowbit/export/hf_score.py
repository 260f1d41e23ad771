"""Score token windows with transformers alone: the independent reader behind the checks of
exported Hugging Face folders (tests, ``benchmarks/hf_export.py``).

``score_folders([DIR, ...], windows)`` runs this file as a script in a fresh interpreter
(``python -I``: neither the current folder nor lowbit is on its path, and the script imports
only torch and transformers), which loads the folder with
``AutoModelForCausalLM.from_pretrained(DIR)`` exactly as a user would and returns the mean
next-token NLL of every window (each position but the last predicts the next token:
lowbit's ``"full"`` perplexity protocol), so the two perplexities compare token for token.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys


class ReaderError(RuntimeError):
    """transformers could not load or run an exported folder (the message has its error)."""


def score_folders(folders: list[str | os.PathLike], windows: list[list[int]], *,
                  timeout: float = 3600) -> dict[str, dict | str]:
    """Per folder, ``{"ppl", "nll_mean", "window_nll", "dtype", "transformers",
    "lowbit_imported"}`` as transformers loads and runs it, or transformers' error message
    (a string) where it cannot; one interpreter scores them all."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    request = {"folders": [os.fspath(f) for f in folders], "windows": windows}
    proc = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)],
                          input=json.dumps(request), capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
        raise ReaderError(f"the transformers process failed: {lines[-1].strip()[:400]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _score(folder: str, windows: list[list[int]]) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    window_nll = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window], dtype=torch.long)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            window_nll.append(float(F.cross_entropy(logits, ids[0, 1:], reduction="mean")))
    nll = sum(window_nll) / len(window_nll)
    return {"ppl": math.exp(nll), "nll_mean": nll, "window_nll": window_nll,
            "dtype": str(model.dtype).removeprefix("torch."),
            "transformers": transformers.__version__,
            "lowbit_imported": any(m.split(".")[0] == "lowbit" for m in sys.modules)}


def _main() -> None:
    import logging

    request = json.load(sys.stdin)
    logged = []  # transformers' load report names the tensors a failed load rejected

    class Keep(logging.Handler):
        def emit(self, record):
            logged.extend(record.getMessage().splitlines())

    logging.getLogger("transformers").addHandler(Keep())
    results = {}
    for folder in request["folders"]:
        logged.clear()
        try:
            results[folder] = _score(folder, request["windows"])
        except Exception as exc:  # transformers' own error, reported per folder
            rejected = [" ".join(ln.split()) for ln in logged if "MISMATCH" in ln or
                        "MISSING" in ln or "UNEXPECTED" in ln][:1]
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            results[folder] = "; ".join([f"{type(exc).__name__}: {message}"[:300], *rejected])
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
