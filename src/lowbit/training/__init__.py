"""Layer between the model API and evaluation: training with quantization in the loop.

Mixed precision (FP16/BF16 autocast with dynamic loss scaling, FP8 emulation), the QAT /
fine-tuning loop with resumable checkpoints, distillation losses and magnitude pruning.
"""

from lowbit.training.distill import (
    causal_lm_distiller,
    causal_lm_loss,
    distillation_loss,
    kd_loss,
)
from lowbit.training.errors import TrainingError
from lowbit.training.fp8 import Fp8Linear, to_fp8_training
from lowbit.training.mixed_precision import PRECISIONS, LossScaler, MixedPrecision
from lowbit.training.pruning import (
    Masks,
    magnitude_mask,
    prune,
    semi_structured_mask,
    sparse_nbytes,
)
from lowbit.training.qat import QATConfig, convert, prepare_qat
from lowbit.training.qat_loop import (
    TrainResult,
    load_checkpoint,
    qat_optimizer,
    save_checkpoint,
    train,
)

__all__ = [
    "QATConfig",
    "convert",
    "prepare_qat",
    "PRECISIONS",
    "Fp8Linear",
    "LossScaler",
    "Masks",
    "MixedPrecision",
    "TrainResult",
    "TrainingError",
    "causal_lm_distiller",
    "causal_lm_loss",
    "distillation_loss",
    "kd_loss",
    "load_checkpoint",
    "magnitude_mask",
    "prune",
    "qat_optimizer",
    "save_checkpoint",
    "semi_structured_mask",
    "sparse_nbytes",
    "to_fp8_training",
    "train",
]
