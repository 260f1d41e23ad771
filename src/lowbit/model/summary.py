"""What ``quantize`` reports: bytes before and after, time, the kernels that run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.kernels.cpu import cpu_features


@dataclass
class QuantizeSummary:
    """What ``quantize`` did: bytes before/after, time, and which kernels run."""

    recipe: str
    layers: int = 0
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    kernels: dict[str, int] = field(default_factory=dict)
    unrotated: list[str] = field(default_factory=list)  # rotation asked, no Hadamard of size
    #: "layer (N inputs): type" where a k-quant grid fell back to llama.cpp's other type
    fallback: list[str] = field(default_factory=list)
    cpu: str = field(default_factory=lambda: cpu_features().describe())

    def lines(self) -> list[str]:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items()))
        return [
            f"recipe        {self.recipe}",
            f"layers        {self.layers} quantized, {len(self.kept)} kept as they were",
            f"linear bytes  {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
            f"({ratio:.3f}x)",
            f"kernels       {kernels or 'none (cast only)'}",
            f"cpu           {self.cpu}",
            f"time          {self.seconds:.1f} s",
        ] + ([f"rotation      {len(self.unrotated)} layers without a Hadamard of their size "
              f"stayed unrotated: {', '.join(self.unrotated[:4])}"] if self.unrotated else []
             ) + ([f"k-quant       {len(self.fallback)} layers have rows that are not a "
                   f"multiple of 256, so they use llama.cpp's fallback type: "
                   f"{', '.join(self.fallback[:3])}"] if self.fallback else []
                  ) + _native_note()


def _native_note() -> list[str]:
    """A line saying lowbit's native kernels were unavailable and why (a failed build)."""
    from lowbit.kernels import native

    why = native.build_failure()
    return [f"native        unavailable, torch's kernels ran instead: {why}; install gcc or "
            f"set CC"] if why else []


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
