"""``prune.structured``: score units, remove a fraction r of the parameters for real, fine-tune.

The study's "ViT-Pruning (r=0.1/0.2)" rows, done so that the model really shrinks:
importance by the study's eq. 7 (Taylor) or eq. 8 (KL), or weight magnitude
(``importance.py``); a global ranking across layers with a floor (``select.py``);
a physical cut that leaves a plain timm ViT (``cut.py``); then a short fine-tune,
by default distilled from the unpruned model (``finetune.py``). r is the fraction
of all parameters removed, as in the study's Size column (327 -> 301 MB at r = 0.1).

The step's meta holds the kept heads, head dims and MLP channels of every block
(``plan``; ``stem_plan``, the kept stem channels, with ``stem: true``), which is all
``restore`` needs to rebuild the shapes on a fresh model,
and the importance score of every unit (``importance``) for the study's Figure 3
(see ``plot.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ... import dist
from ...config import LATE, check
from ...models.arch import PLAIN_VIT, needs_plain_vit
from ..registry import StepOutput, register_method
from .cut import apply_plans, plan_from_meta, plan_to_meta, ranges
from .finetune import finetune
from .groups import CoupledGroup, find_groups
from .importance import GroupScores, importance_scores, magnitude_importance
from .select import PrunePlan, plan_pruning


@dataclass(frozen=True)
class StructuredPruneConfig:
    ratio: float = 0.2  # fraction of all parameters removed
    importance: Literal["taylor", "magnitude", "kl", "gate"] = "taylor"
    ranking: Literal["global", "layer"] = "global"
    min_keep: float = 0.1  # every layer keeps at least this fraction of its heads/dims and channels (and >= 1)
    heads: bool = True  # prune attention too; false: MLP channels only
    head_unit: Literal["head", "dim"] = "head"  # remove whole heads, or the same number of dims from every head
    # Keep at most this many heads per block (the least important go first, counted in the ratio), then
    # rank as usual: with head_unit dim, dims among the heads kept. Fewer, wider heads run faster on a
    # CPU at the same parameter count (select.py). null: no cap.
    max_heads: int | None = field(default=None, metadata=LATE)
    # Also prune the output channels of a conv stem's 3x3 convs (vitc_small), ranked with the rest.
    stem: bool = field(default=False, metadata=LATE)
    calib_batches: int = 4  # batches of 64 calibration images for taylor / kl
    kl_chunks: int = 16  # kl: candidate chunks per MLP layer (and per head's dims)
    finetune_epochs: int = 1
    finetune_subset: int | None = None  # fine-tune (and train gates) on this many training images; null: all
    lr: float | None = None  # fine-tune peak lr; null: a tenth of the baseline's
    distill: bool = True  # fine-tune with soft KD from the unpruned baseline (ctx.teacher); false: plain CE
    distill_alpha: float = 0.5  # weight of the KD term; 1 - alpha on cross-entropy
    temperature: float = 2.0

    def __post_init__(self) -> None:
        _check_common(self)
        check(self.importance != "gate",
              "importance 'gate' comes from trained soft gates: use the prune.gates method")


def _check_common(cfg: StructuredPruneConfig) -> None:
    check(0 < cfg.ratio < 1, f"ratio is the fraction of parameters removed, in (0, 1); got {cfg.ratio}")
    check(0 <= cfg.min_keep <= 1, f"min_keep must be in [0, 1], got {cfg.min_keep}")
    check(cfg.max_heads is None or cfg.max_heads >= 1, f"max_heads must be at least 1 (or null), got {cfg.max_heads}")
    check(cfg.max_heads is None or cfg.heads, "max_heads caps attention heads; it needs heads: true")
    check(cfg.calib_batches >= 1, f"calib_batches must be >= 1, got {cfg.calib_batches}")
    check(cfg.kl_chunks >= 1, f"kl_chunks must be >= 1, got {cfg.kl_chunks}")
    check(cfg.finetune_epochs >= 0, f"finetune_epochs must be >= 0, got {cfg.finetune_epochs}")
    check(cfg.finetune_subset is None or cfg.finetune_subset >= 1,
          f"finetune_subset must be >= 1 or null, got {cfg.finetune_subset}")
    check(cfg.lr is None or 0 < cfg.lr < 10, f"lr must be in (0, 10) or null, got {cfg.lr}")
    check(0 <= cfg.distill_alpha <= 1, f"distill_alpha must be in [0, 1], got {cfg.distill_alpha}")
    check(cfg.temperature > 0, f"temperature must be > 0, got {cfg.temperature}")


def calibration_batches(ctx: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of ``n`` batches of 64 calibration images (all of them in one process).

    Under ``accelerate launch`` each process scores its own batches and the
    importance functions add the scores across processes (``importance.py``).
    """
    batches = list(ctx.calib_loader(n=64 * n, batch_size=64))
    part = dist.shard(len(batches))
    return batches[part.start:part.stop]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def importance_meta(criterion: str, groups: list[CoupledGroup], scores: list[GroupScores],
                    plan: PrunePlan, attention: str | None) -> dict[str, Any]:
    """Per group: the unit, its parameter cost, every unit's score (4 digits) and which were pruned."""
    out = []
    for g, s in zip(groups, scores, strict=True):
        if g.kind == "stem":
            kept = set(plan.stem[g.block])
            out.append({"block": g.block, "kind": "stem", "unit": "channel", "params_per_unit": g.unit_cost,
                        "scores": [_round(v) for v in s.units.tolist()],
                        "pruned": ranges([i for i in range(g.shape[0]) if i not in kept])})
            continue
        bp = plan.blocks[g.block]
        if g.kind == "mlp":
            kept = set(bp.mlp)
            out.append({"block": g.block, "kind": "mlp", "unit": "channel", "params_per_unit": g.unit_cost,
                        "scores": [_round(v) for v in s.units.tolist()],
                        "pruned": ranges([i for i in range(g.shape[0]) if i not in kept])})
        elif attention == "head":
            assert s.heads is not None
            # Gates rank heads by their mean gate (select.py); other criteria by the head's total score.
            heads = s.heads / g.shape[1] if criterion == "gate" else s.heads
            out.append({"block": g.block, "kind": "attn", "unit": "head", "params_per_unit": g.head_cost,
                        "scores": [_round(v) for v in heads.tolist()],
                        "pruned": ranges([h for h in range(g.shape[0]) if h not in bp.heads])})
        elif attention == "dim":
            d = g.shape[1]
            kept_dims = {h * d + j for h, dims in zip(bp.heads, bp.dims) for j in dims}
            out.append({"block": g.block, "kind": "attn", "unit": "dim", "params_per_unit": g.unit_cost,
                        "scores": [_round(v) for v in s.units.flatten().tolist()],
                        "pruned": ranges([i for i in range(g.units) if i not in kept_dims])})
    # "per": what the ranking compared - score per parameter, or the (gate) score of each unit as it is.
    return {"criterion": criterion, "per": "unit" if criterion == "gate" else "parameter", "groups": out}


def prune_and_finetune(model: nn.Module, cfg: StructuredPruneConfig, ctx: Any, groups: list[CoupledGroup],
                       scores: list[GroupScores], *, teacher: nn.Module | None) -> StepOutput:
    """Plan the cut from ``scores``, cut ``model`` (in place), fine-tune; the step's output and meta."""
    total = count_parameters(model)
    attention = cfg.head_unit if cfg.heads else None
    plan, removed = plan_pruning(groups, scores, magnitude_importance(model, groups), ratio=cfg.ratio,
                                 total_params=total, attention=attention, min_keep=cfg.min_keep,
                                 ranking=cfg.ranking, per="unit" if cfg.importance == "gate" else "parameter",
                                 max_heads=cfg.max_heads)
    apply_plans(model, plan)
    after = count_parameters(model)
    model, history = finetune(model, ctx, epochs=cfg.finetune_epochs, lr=cfg.lr, subset=cfg.finetune_subset,
                              distill=cfg.distill,
                              temperature=cfg.temperature, alpha=cfg.distill_alpha, teacher=teacher,
                              desc=f"{ctx.name} fine-tune")
    meta = {
        **plan_to_meta(plan),
        "params_before": total,
        "params_after": after,
        "removed_fraction": (total - after) / total,
        "importance": importance_meta(cfg.importance, groups, scores, plan, attention),
        "finetune_history": history,
    }
    return StepOutput(model.eval(), meta)


def _teacher(ctx: Any, model: nn.Module, cfg: StructuredPruneConfig) -> nn.Module | None:
    # The unpruned model teaches: the study's baseline when the context has it, else this step's input.
    if not cfg.distill or cfg.finetune_epochs == 0:
        return None
    return ctx.teacher if ctx.teacher is not None else copy.deepcopy(model).eval()


def restore_pruned(model: nn.Module, cfg: Any, meta: dict[str, Any]) -> nn.Module:
    """Rebuild the pruned shapes on a fresh model of the step's input architecture."""
    return apply_plans(model, plan_from_meta(meta))


@register_method(
    "prune.structured",
    StructuredPruneConfig,
    family="pruning",
    summary="remove a fraction r of parameters (heads/head dims, MLP channels, stem channels) by "
            "Taylor/KL/magnitude; fine-tune",
    restore=restore_pruned,
    supports=PLAIN_VIT,
    requires=needs_plain_vit,
)
def prune_structured(model: nn.Module, cfg: StructuredPruneConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model)  # never change the caller's model
    teacher = _teacher(ctx, model, cfg)
    groups = find_groups(model, stem=cfg.stem)
    batches = calibration_batches(ctx, cfg.calib_batches) if cfg.importance in ("taylor", "kl") else []
    scores = importance_scores(cfg.importance, model, groups, batches, chunks=cfg.kl_chunks,
                               attention_unit=cfg.head_unit)
    return prune_and_finetune(model, cfg, ctx, groups, scores, teacher=teacher)
