"""Distillation losses: soft (eq. 4), hard (eq. 5) and DeiT's distillation-token loss.

* soft, Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") in
  DeiT's notation (Touvron et al. 2021, eq. 2; the study's eq. 4):
  ``(1 - λ) CE(z_s, y) + λ τ² KL(softmax(z_t / τ) || softmax(z_s / τ))``.
  The teacher's softened distribution is the target, the direction Hinton and
  DeiT implement; τ² keeps the soft term's gradients at the scale of the
  label term's, which shrink as 1/τ², so λ means the same at any τ.
  The KL is averaged over the batch (``batchmean``: the true per-sample KL).
* hard, DeiT eq. 3 (the study's eq. 5): the teacher's argmax is a second label,
  ``(1 - λ) CE(z_s, y) + λ CE(z_s, argmax z_t)``; λ = ½ is the equation as written.
* deit, DeiT section 4: the class head's logits take the label term and the
  distillation head's logits the teacher term (hard by default, soft selectable).

Every function takes logits, so it can be checked by hand; ``make_distill_loss``
wraps one into the ``loss_fn(model, x, y)`` that the training loop calls.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import VitcompressError
from ...train import LossFn

LossName = Literal["soft", "hard", "deit"]
DistTarget = Literal["hard", "soft"]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(z_t / τ) || softmax(z_s / τ)), averaged over the batch (without the τ² factor)."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                           alpha: float = 0.5, tau: float = 3.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 4: ``(1 - alpha) CE(z_s, y) + alpha tau² KL(softmax(z_t/tau) || softmax(z_s/tau))``."""
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return (1 - alpha) * ce + alpha * tau**2 * soft_kl(student_logits, teacher_logits, tau)


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                           alpha: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 5 (alpha = ½): ``(1 - alpha) CE(z_s, y) + alpha CE(z_s, argmax z_t)``.

    The teacher's label is taken as given, without smoothing, as DeiT does.
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return (1 - alpha) * ce + alpha * F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def deit_distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor, *, target: DistTarget = "hard", alpha: float = 0.5, tau: float = 3.0,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """DeiT: the class head learns the label, the distillation head learns the teacher (hard or soft)."""
    ce = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    if target == "hard":
        teach = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    else:
        teach = tau**2 * soft_kl(dist_logits, teacher_logits, tau)
    return (1 - alpha) * ce + alpha * teach


def make_distill_loss(name: LossName, teacher: nn.Module, *, alpha: float = 0.5, tau: float = 3.0,
                      dist_target: DistTarget = "hard", label_smoothing: float = 0.0) -> LossFn:
    """The ``loss_fn(model, x, y)`` for ``ctx.fit``: the teacher runs without gradients, in eval mode.

    For ``deit`` the student must be in distilled training mode
    (``set_distilled_training(True)``), so that it returns (class, distillation) logits.
    """
    if name not in ("soft", "hard", "deit"):
        raise VitcompressError(f"unknown distillation loss '{name}'; use soft, hard or deit")

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x).float()
        out = model(x)
        if name == "deit":
            if not isinstance(out, tuple):
                raise VitcompressError("loss 'deit' needs a student with a distillation token (dist_token: true)")
            cls_logits, dist_logits = out
            return deit_distillation_loss(cls_logits, dist_logits, teacher_logits, y, target=dist_target,
                                          alpha=alpha, tau=tau, label_smoothing=label_smoothing)
        if name == "soft":
            return soft_distillation_loss(out, teacher_logits, y, alpha=alpha, tau=tau,
                                          label_smoothing=label_smoothing)
        return hard_distillation_loss(out, teacher_logits, y, alpha=alpha, label_smoothing=label_smoothing)

    return loss_fn
