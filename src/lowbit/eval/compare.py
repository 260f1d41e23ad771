"""Compare a model's next-token distributions with a baseline's, as llama-perplexity's
KL-divergence mode does: mean and 99th-percentile KL(P_baseline || Q_model) per token and
the share of tokens whose most likely next token agrees (top-1).

The baseline's log-probabilities are computed once per (model, data) and kept in memory
(bf16, 16k x 49152 = 1.6 GB for SmolLM2), so evaluating many candidates costs one pass each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


class ComparisonError(LowbitError, ValueError):
    """The model cannot be compared with the baseline; the message names the fix."""


@dataclass(frozen=True)
class ComparisonReport:
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    n_tokens: int

    def to_dict(self) -> dict:
        return {"kld_mean": self.kld_mean, "kld_p99": self.kld_p99,
                "top1_agreement": self.top1_agreement}


class BaselineLogprobs:
    """Collects a baseline's per-window log-probabilities (a ``perplexity`` logits hook)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.windows: dict[int, torch.Tensor] = {}

    def __call__(self, index: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.windows[index] = torch.log_softmax(logits.float(), -1).to(self.dtype)


class KLAccumulator:
    """A ``perplexity`` logits hook that compares each window against the baseline."""

    def __init__(self, baseline: BaselineLogprobs) -> None:
        self.baseline = baseline
        self.kld: list[torch.Tensor] = []
        self.agree = 0
        self.count = 0

    def __call__(self, index: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if index not in self.baseline.windows:
            raise ComparisonError("the baseline was evaluated on other data or fewer windows: "
                                  "evaluate both models on the same data, window and count")
        base = self.baseline.windows[index].float()
        if base.shape != logits.shape:
            raise ComparisonError(
                f"baseline and model disagree on the vocabulary ({base.shape[-1]} vs "
                f"{logits.shape[-1]} logits): compare models that share a tokenizer")
        logq = torch.log_softmax(logits.float(), -1)
        self.kld.append((base.exp() * (base - logq)).sum(-1))
        self.agree += int((base.argmax(-1) == logq.argmax(-1)).sum())
        self.count += logits.shape[0]

    def report(self) -> ComparisonReport:
        kld = torch.cat(self.kld).double()
        return ComparisonReport(float(kld.mean()), float(torch.quantile(kld, 0.99)),
                                self.agree / self.count, self.count)
