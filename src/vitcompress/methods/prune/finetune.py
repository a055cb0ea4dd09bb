"""Fine-tuning after a cut, optionally distilled from the unpruned model.

The soft-target loss is the distillation family's (``make_distill_loss("soft", ...)``, Hinton et al.'s
knowledge distillation): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..distill.losses import make_distill_loss


def finetune_overrides(ctx: Any, epochs: int, lr: float | None, subset: int | None = None) -> dict[str, Any]:
    """TrainConfig overrides for a short fine-tune of a trained model.

    The learning rate defaults to a tenth of the baseline's: the weights are
    trained, and a full-size step undoes more than the cut did (on vitc_quick at
    r = 0.2, one KD epoch on 10k images: 78.75% at half the baseline lr, 78.92% at
    a tenth, baseline 78.74%). Warm-up is at most a fifth of the fine-tune.
    """
    base = ctx.baseline_train
    lr = lr if lr is not None else base.lr * 0.1
    out = {"epochs": epochs, "lr": lr, "min_lr": min(base.min_lr, lr),
           "warmup_epochs": min(base.warmup_epochs, 0.2 * epochs)}
    if subset is not None:
        out["train_subset"] = subset
    return out


def finetune(model: nn.Module, ctx: Any, *, epochs: int, lr: float | None, subset: int | None, distill: bool,
             temperature: float,
             alpha: float, teacher: nn.Module | None, desc: str) -> tuple[nn.Module, list[dict[str, float]]]:
    """Fine-tune through ``ctx.fit``; with ``distill`` the loss is soft KD from ``teacher``."""
    if epochs == 0:
        return model, []
    loss_fn = None
    extra: tuple[nn.Module, ...] = ()
    if distill:
        if teacher is None:
            raise RuntimeError("distillation needs a teacher")  # the caller falls back to the unpruned model
        loss_fn = make_distill_loss("soft", teacher, alpha=alpha, tau=temperature,
                                    label_smoothing=ctx.baseline_train.label_smoothing)
        extra = (teacher,)
    result = ctx.fit(model, loss_fn=loss_fn, desc=desc, extra_modules=extra,
                     **finetune_overrides(ctx, epochs, lr, subset))
    return result.model, result.history
