"""``prune.gates``: Visual Transformer Pruning (Zhu et al., the study's ref [15], Fig. 2a).

A learnable soft gate multiplies every prunable dimension - each (head, dim) of
q/k/v and each MLP hidden unit (``masks.py``) - and is trained together with the
weights through the shared training loop, with an L1 penalty that drives the
gates of unneeded dimensions towards zero:

    loss = CE(model(x), y) + l1 * sum_gates |g|

(VTP's sparsity objective; the sum, not the mean, so ``l1`` is a per-gate pull as in
the paper). VTP trains the weights along with the gates; by default here only the
gates train (``gate_weights: false``), at their own learning rate, which finds the
unneeded dimensions in a fraction of an epoch. Afterwards the gate values are folded into the weights (exact), the
gates become hard - the dimensions with the smallest |g| per parameter are cut until
a fraction ``ratio`` of the parameters is gone (the threshold for the target ratio)
- and the smaller model is fine-tuned like ``prune.structured``. ``importance``
may instead rank by Taylor, KL or magnitude on the gate-trained model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check
from ...models.arch import PLAIN_VIT, needs_plain_vit
from ..registry import StepOutput, register_method
from .finetune import finetune_overrides
from .groups import find_groups
from .importance import gate_importance, importance_scores
from .masks import gate_parameters, install_gates, remove_gates
from .structured import (
    StructuredPruneConfig,
    _check_common,
    _teacher,
    calibration_batches,
    prune_and_finetune,
    restore_pruned,
)


@dataclass(frozen=True)
class GatePruneConfig(StructuredPruneConfig):
    importance: Literal["taylor", "magnitude", "kl", "gate"] = "gate"
    head_unit: Literal["head", "dim"] = "dim"  # VTP gates each head dimension
    gate_epochs: int = 1  # epochs of training with gates and the L1 penalty
    l1: float = 1e-4  # L1 weight per gate
    gate_lr: float = 1e-2  # peak lr of the gate phase (gates are O(1) scalars; lower it with gate_weights)
    gate_weights: bool = False  # train the weights with the gates (VTP) instead of the gates alone

    def __post_init__(self) -> None:
        _check_common(self)
        check(self.gate_epochs >= 1, f"gate_epochs must be >= 1, got {self.gate_epochs}")
        check(self.l1 >= 0, f"l1 must be >= 0, got {self.l1}")
        check(0 < self.gate_lr < 10, f"gate_lr must be in (0, 10), got {self.gate_lr}")


def gate_l1_loss(l1: float, label_smoothing: float) -> Any:
    """``loss_fn(model, x, y)``: cross-entropy plus ``l1 * sum |gate|`` over every gate in the model."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        penalty = sum(g.abs().sum() for g in gate_parameters(model))
        return ce + l1 * penalty

    return loss_fn


def train_gates(model: nn.Module, cfg: GatePruneConfig, ctx: Any) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train the gates (and with ``gate_weights`` the weights) with the L1 penalty.

    Checkpoints go to ``work_dir/gates`` (the fine-tune after the cut has its own).
    Frozen weights are left out of the optimizer by the training loop, so by
    default only the gates move: a short, cheap phase can then use a learning rate
    that suits O(1) gates without disturbing the trained weights.
    """
    frozen = [] if cfg.gate_weights else [p for p in model.parameters() if p.requires_grad]
    gates = set(map(id, gate_parameters(model)))
    for p in frozen:
        if id(p) not in gates:
            p.requires_grad_(False)
    try:
        gate_ctx = replace(ctx, work_dir=ctx.work_dir / "gates", name=f"{ctx.name} gates")
        result = gate_ctx.fit(model, loss_fn=gate_l1_loss(cfg.l1, ctx.baseline_train.label_smoothing),
                              desc=f"{ctx.name} gates + L1",
                              **finetune_overrides(ctx, cfg.gate_epochs, cfg.gate_lr, cfg.finetune_subset))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return result.model, result.history


@register_method(
    "prune.gates",
    GatePruneConfig,
    family="pruning",
    summary="VTP: learnable soft gates per head dim / MLP unit with L1, hardened at ratio r, cut, fine-tuned",
    restore=restore_pruned,
    supports=PLAIN_VIT,
    requires=needs_plain_vit,
)
def prune_gates(model: nn.Module, cfg: GatePruneConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model)
    teacher = _teacher(ctx, model, cfg)
    groups = find_groups(model, stem=cfg.stem)
    install_gates(model, groups)
    model, history = train_gates(model, cfg, ctx)
    gates = gate_importance(model, groups)
    remove_gates(model, groups, fold=True)  # exact: the kept units compute what they did with their gates
    if cfg.importance == "gate":
        scores = gates
    else:
        batches = calibration_batches(ctx, cfg.calib_batches) if cfg.importance in ("taylor", "kl") else []
        scores = importance_scores(cfg.importance, model, groups, batches, chunks=cfg.kl_chunks,
                                   attention_unit=cfg.head_unit)
    out = prune_and_finetune(model, cfg, ctx, groups, scores, teacher=teacher)
    out.meta["gate_history"] = history
    return out
