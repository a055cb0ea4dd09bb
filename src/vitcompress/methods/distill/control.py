"""``train``: the distillation study's control, the same student trained without a teacher.

DeiT (Touvron et al. 2021, Table 3) reads what distillation adds by comparing a
distilled student with the same architecture trained on the labels alone; this
method is that second row. It trains a fresh student ("tiny", "same" or a model
name, as in :mod:`.students`, the layout read from the incoming model) with the
baseline's plain label-smoothed cross-entropy, through the same loop and budget
as ``distill``. By default the student has no distillation token (DeiT's
"no distillation" row); ``dist_token: true`` gives the token architecture
trained on labels only, both heads averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...config import LATE, check
from ...models import is_known_model
from ..registry import StepOutput, register_method
from .method import (
    build_student,
    check_student_weights,
    check_width,
    needs_layout_teacher,
    restore_student,
    student_output,
    train_kwargs,
)
from .selection import select_weights
from .students import STUDENT_CHOICES


@dataclass(frozen=True)
class TrainStudentConfig:
    student: str = "tiny"  # "tiny", "same", "input" (keep training the incoming model) or a model name
    dist_token: bool = False
    epochs: int | None = None  # None: as many as the baseline trained
    lr: float | None = None  # None: the baseline's
    train_subset: int | None = None  # None: the baseline's
    pretrained: bool = False  # a named hub student starts from hub weights
    checkpoint: str | None = field(default=None, metadata=LATE)  # or from a local file (as distill's)
    augment: bool | None = field(default=None, metadata=LATE)  # random crop + flip; None: as the baseline trained
    width: float | None = field(default=None, metadata=LATE)  # student "tiny"'s fraction of the width (None: ½)
    heads: int | None = field(default=None, metadata=LATE)  # student "tiny"'s head count (None: as distill's)
    stem: float | None = field(default=None, metadata=LATE)  # tiny's stem fraction (None: width; 0: no stem)
    depth: int | None = field(default=None, metadata=LATE)  # tiny's block count (None: the incoming model's)
    # "tiny": start at a selection of the incoming model's weights (as distill's init_from_teacher) and train
    # on labels alone: the row that tells the teacher's weights from the teacher's targets.
    init_from_teacher: bool = field(default=False, metadata=LATE)

    def __post_init__(self) -> None:
        check(self.student in STUDENT_CHOICES or is_known_model(self.student),
              f"unknown student '{self.student}'; use tiny, same, input or a model name")
        check_width(self.student, self.width, self.heads, self.stem, self.depth)
        check(not self.init_from_teacher or self.student == "tiny",
              "init_from_teacher here needs student: tiny (for 'same', keep training with student: input)")
        check(self.epochs is None or self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.lr is None or 0 < self.lr < 10, f"lr must be in (0, 10), got {self.lr}")
        check(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1 or null")
        check(not (self.student == "input" and self.dist_token),
              "student 'input' keeps the incoming model as it is; drop dist_token")
        check_student_weights(self.student, self.pretrained, self.checkpoint)


@register_method(
    "train",
    TrainStudentConfig,
    family="training",
    summary="train a student on the labels alone (the control row for distillation)",
    restore=restore_student,
    supports="any model; students same/tiny need a timm ViT of plain blocks to copy",
    requires=needs_layout_teacher,
)
def train_student(model: nn.Module, cfg: TrainStudentConfig, ctx: Any) -> StepOutput:
    student, spec = build_student(cfg.student, model, model, ctx, dist_token=cfg.dist_token,
                                  pretrained=cfg.pretrained, width=cfg.width, heads=cfg.heads,
                                  stem=cfg.stem, depth=cfg.depth, checkpoint=cfg.checkpoint)
    selected = select_weights(student, model) if cfg.init_from_teacher else None
    result = ctx.fit(student, desc=f"{ctx.name} (labels only)", **train_kwargs(cfg))
    return student_output(result, spec, selected, cfg.student)
