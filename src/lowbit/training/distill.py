"""Knowledge distillation: the student matches the teacher's softened output distribution.

Hinton et al., 2015 ("Distilling the Knowledge in a Neural Network", sec. 2): with
temperature ``T``, ``p_T = softmax(z_teacher / T)`` and ``p_S = softmax(z_student / T)``;
the loss is ``T^2 * KL(p_T || p_S)``, the ``T^2`` keeping gradient magnitudes comparable
across temperatures. For a quantized student the teacher is the full-precision model (as in
LLM-QAT, Liu et al., 2023, and BitDistiller, Du et al., 2024): the loss then measures
exactly what quantization changed, and needs no labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.training.errors import TrainingError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over positions.

    Logits are ``(..., classes)``; ``mask`` (``...``, bool) selects the positions that count.
    """
    if student_logits.shape != teacher_logits.shape:
        raise TrainingError(f"student logits {tuple(student_logits.shape)} and teacher "
                            f"logits {tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise TrainingError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    if kl.numel() == 0:
        raise TrainingError("no positions to distil (the mask selects nothing)")
    return kl.mean() * t * t


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, *, alpha: float = 1.0,
            temperature: float = 1.0) -> torch.Tensor:
    """``alpha * distillation + (1 - alpha) * cross-entropy(labels)`` (Hinton et al., 2015)."""
    loss = distillation_loss(student_logits, teacher_logits, temperature)
    if alpha < 1.0:
        if labels is None:
            raise TrainingError("alpha < 1 mixes in cross-entropy: pass labels")
        ce = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                             labels.reshape(-1))
        loss = alpha * loss + (1 - alpha) * ce
    return loss


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def causal_lm_distiller(teacher: nn.Module, temperature: float = 1.0
                        ) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``loss_fn(student, input_ids)`` for a causal LM: KL to ``teacher`` on every position.

    The teacher runs without gradients in eval mode.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = _logits(teacher(batch))
        s_logits = _logits(student(batch))
        return distillation_loss(s_logits, t_logits.to(s_logits.dtype), temperature)

    return loss_fn


def causal_lm_loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (the loss without a teacher)."""
    logits = _logits(student(batch))[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           batch[:, 1:].reshape(-1))
