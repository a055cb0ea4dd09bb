"""``distill``: train a student from a teacher (the study's "DeiT base" and "DeiT tiny" rows).

Knowledge distillation (Hinton et al. 2015) with the losses of :mod:`.losses`:
soft (the study's eq. 4), hard (eq. 5) or DeiT's distillation token (Touvron et
al. 2021, section 4; the default, as in the study's DeiT rows). The teacher is
the study's baseline unless the config names another (an artifact folder, or a
checkpoint file with its model name, a timm CNN included); it runs without
gradients in eval mode. The student is built fresh (see :mod:`.students`), from
random weights or, with ``init_from_teacher``, from the teacher's ("same": a
copy; "tiny": a selection of them, see :mod:`.selection`), and trained through
the shared loop, so it resumes after a kill and runs under ``accelerate launch``. The step's output replaces the incoming model: the
artifact's meta holds the student's ``ModelSpec``, from which ``restore``
rebuilds it.

Teacher logits are not cached: the loss sees only a batch, not which images it
holds, and the loop augments every epoch anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...config import LATE, check
from ...errors import VitcompressError
from ...models import ModelSpec, create_model, is_known_model, load_model, load_weights
from ...models.arch import plain_vit_problem
from ..registry import StepOutput, register_method
from .losses import DistTarget, LossName, make_distill_loss
from .selection import select_weights
from .students import STUDENT_CHOICES, check_same_layout, init_from_teacher, student_spec


@dataclass(frozen=True)
class DistillConfig:
    # "same" (teacher's layout), "tiny" (half width, ~1/4 the parameters), "input" (the incoming model), or a name.
    student: str = "same"
    # None: a distillation token for loss "deit", none for "soft"/"hard" (DeiT's plain-distillation rows).
    dist_token: bool | None = None
    loss: LossName = "deit"
    dist_target: DistTarget = "hard"  # what the distillation head learns with loss "deit"
    alpha: float = 0.5  # λ: the teacher term's weight (hard / deit: ½ as in eq. 5 and DeiT)
    # τ = 3 softens a confident teacher enough to pass on how it ranks the wrong classes (Hinton et al.'s
    # "dark knowledge"); at τ = 1 a label-smoothed teacher's target is almost its argmax. τ² keeps λ's meaning.
    tau: float = 3.0
    epochs: int | None = None  # None: as many as the baseline trained
    lr: float | None = None  # None: the baseline's
    train_subset: int | None = None  # None: the baseline's
    # Random crop + flip (None: as the baseline trained). The teacher sees each augmented view, so it
    # labels images the dataset does not hold ("consistent" distillation, Beyer et al. 2022).
    augment: bool | None = field(default=None, metadata=LATE)
    # Start from the teacher's weights instead of random ones: "same" copies them; "tiny" takes a selection of
    # them (weight selection, Xu et al. 2024; see .selection): the teacher's first blocks, its strongest
    # residual channels, heads, MLP units and stem channels.
    init_from_teacher: bool = False
    pretrained: bool = False  # a named hub student (e.g. deit_tiny_distilled_patch16_224) starts from hub weights
    # A named student's weights from a local file (.safetensors / .pth), through timm's loading path: the offline
    # twin of pretrained (position embeddings resampled, a head of another class count re-initialised).
    checkpoint: str | None = field(default=None, metadata=LATE)
    teacher: str | None = None  # None: the study's baseline; else an artifact folder or a checkpoint file
    teacher_model: str | None = None  # the model a teacher checkpoint file fits (None: the baseline's)
    # Student "tiny"'s fraction of the teacher's width (None: a half); 0.25 is DeiT-Ti's ratio to DeiT-B.
    width: float | None = field(default=None, metadata=LATE)
    # Student "tiny"'s head count (None: the teacher's, fewer if a head would be under 16 channels).
    heads: int | None = field(default=None, metadata=LATE)
    # Student "tiny"'s conv stem as a fraction of the teacher's channels (None: as width; 0: no stem, a plain
    # patch projection, as DeiT's students have).
    stem: float | None = field(default=None, metadata=LATE)
    depth: int | None = field(default=None, metadata=LATE)  # student "tiny"'s block count (None: the teacher's)

    def __post_init__(self) -> None:
        check(self.student in STUDENT_CHOICES or is_known_model(self.student),
              f"unknown student '{self.student}'; use same, tiny, input or a model name")
        check_width(self.student, self.width, self.heads, self.stem, self.depth)
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.tau > 0, f"tau must be > 0, got {self.tau}")
        check(self.epochs is None or self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.lr is None or 0 < self.lr < 10, f"lr must be in (0, 10), got {self.lr}")
        check(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1 or null")
        check(not (self.loss == "deit" and self.dist_token is False),
              "loss 'deit' trains the distillation token's head; drop dist_token: false or pick loss soft/hard")
        check(not (self.student == "input" and self.dist_token is not None),
              "student 'input' keeps the incoming model as it is; drop dist_token")
        check(not self.init_from_teacher or self.student in ("same", "tiny"),
              "init_from_teacher needs student: same or tiny")
        check_student_weights(self.student, self.pretrained, self.checkpoint)
        check(self.teacher_model is None or self.teacher is not None, "teacher_model needs teacher (a checkpoint)")
        check(self.teacher_model is None or is_known_model(self.teacher_model),
              f"unknown teacher_model '{self.teacher_model}'")

    @property
    def uses_token(self) -> bool:
        return self.loss == "deit" if self.dist_token is None else self.dist_token


def load_teacher(cfg: DistillConfig, ctx: Any, incoming: nn.Module) -> nn.Module:
    """The teacher the config names: the study's baseline, an artifact, or a checkpoint file."""
    if cfg.teacher is None:
        # Without a study (a bare context), the incoming model teaches.
        return ctx.teacher if ctx.teacher is not None else incoming
    path = Path(cfg.teacher)
    if path.is_dir():
        from ...artifact import load_artifact

        return load_artifact(path)
    if cfg.teacher_model is not None:
        model = _create_teacher(cfg.teacher_model, ctx)
    elif ctx.teacher is not None:
        model = copy.deepcopy(ctx.teacher)  # a checkpoint of the baseline's architecture
    else:
        raise VitcompressError(f"teacher {path}: set teacher_model to the model this checkpoint fits")
    return load_weights(model, path).eval()


def _create_teacher(name: str, ctx: Any) -> nn.Module:
    # The teacher is never saved, so it needs no ModelSpec; a CNN takes any image size and has no
    # img_size argument, which create_model (made for ViTs) always passes.
    kwargs = {"num_classes": ctx.num_classes, "in_chans": ctx.in_chans}
    try:
        return timm.create_model(name, img_size=ctx.img_size, **kwargs)
    except TypeError:
        return timm.create_model(name, **kwargs)


def check_width(student: str, width: float | None, heads: int | None = None, stem: float | None = None,
                depth: int | None = None) -> None:
    """The one-line errors for a student's ``width``, ``heads``, ``stem`` and ``depth`` settings (the "tiny"
    student's layout); whether ``heads`` divides the width is checked when the teacher is known
    (``quarter_arch``)."""
    check(width is None or student == "tiny", f"width sets the 'tiny' student's width; drop it for student {student}")
    check(width is None or 0 < width < 1, f"width is a fraction of the teacher's width in (0, 1), got {width}")
    check(heads is None or student == "tiny", f"heads sets the 'tiny' student's head count; drop it for student {student}")
    check(heads is None or heads >= 1, f"heads must be >= 1, got {heads}")
    check(stem is None or student == "tiny", f"stem sets the 'tiny' student's conv stem; drop it for student {student}")
    check(stem is None or 0 <= stem <= 1, f"stem is a fraction of the teacher's stem channels in [0, 1] "
                                          f"(0: a plain patch projection), got {stem}")
    check(depth is None or student == "tiny", f"depth sets the 'tiny' student's block count; drop it for student {student}")
    check(depth is None or depth >= 1, f"depth must be >= 1, got {depth}")


def check_student_weights(student: str, pretrained: bool, checkpoint: str | None) -> None:
    """The one-line errors for where a named student's weights come from."""
    check(not pretrained or (student not in STUDENT_CHOICES and not student.startswith("vitc_")),
          "pretrained applies to a named hub student (e.g. deit_tiny_distilled_patch16_224); "
          "same/tiny/input and the vitc_* presets have no hub weights")
    check(checkpoint is None or student not in STUDENT_CHOICES,
          f"checkpoint gives a named student its weights; student {student!r} has none to load")
    check(not (pretrained and checkpoint), "give pretrained (hub weights, online) or checkpoint (a local file), "
                                           "not both")


def build_student(choice: str, reference: nn.Module, incoming: nn.Module, ctx: Any, *, dist_token: bool,
                  pretrained: bool, width: float | None = None, heads: int | None = None,
                  stem: float | None = None, depth: int | None = None, checkpoint: str | None = None,
                  ) -> tuple[nn.Module, dict[str, Any] | None]:
    """The student module and the spec that rebuilds it (None for "input", which keeps ``incoming``).

    A named student is any model a recipe's baseline can be (a timm name, a transformers folder,
    a preset), with hub weights (``pretrained``) or a local ``checkpoint``.
    """
    if choice == "input":
        return incoming, None
    if choice in ("same", "tiny"):
        spec = student_spec(choice, reference, dist_token=dist_token, num_classes=ctx.num_classes,
                            img_size=ctx.img_size, in_chans=ctx.in_chans, width=width, heads=heads, stem=stem,
                            depth=depth)
        student = create_model(spec)
        if choice == "same":
            check_same_layout(student, reference)
    else:
        loaded = load_model(choice, num_classes=ctx.num_classes, img_size=ctx.img_size, in_chans=ctx.in_chans,
                            pretrained=pretrained, checkpoint=checkpoint)
        student, spec = loaded.model, loaded.spec
    # Saved without hub or file sources: the artifact's own tensors fill the rebuilt student.
    return student, spec.to_dict() | {"pretrained": False, "checkpoint": None}


def needs_layout_teacher(model: nn.Module, cfg: Any, example_shape: tuple[int, ...] | None = None) -> str | None:
    """A requirement (see ``register_method``): students "same" and "tiny" copy a ViT's layout."""
    if getattr(cfg, "student", None) not in ("same", "tiny") or getattr(cfg, "teacher", None) is not None:
        return None
    problem = plain_vit_problem(model)
    return (f"student {cfg.student!r} copies the incoming ViT's layout, and {problem}; name a student model"
            if problem else None)


def restore_student(model: nn.Module, cfg: Any, meta: dict[str, Any]) -> nn.Module:
    """The student this step produced, rebuilt from meta (the incoming model is only kept for "input")."""
    spec = meta.get("student")
    if spec is None:
        return model
    return create_model(ModelSpec(**spec))


def train_kwargs(cfg: Any) -> dict[str, Any]:
    """TrainConfig overrides from a method config's epochs / lr / train_subset / augment (None keeps the
    baseline's)."""
    return {k: getattr(cfg, k) for k in ("epochs", "lr", "train_subset", "augment") if getattr(cfg, k) is not None}


def student_output(result: Any, spec: dict[str, Any] | None, selected: dict[str, Any] | None,
                   source: str | None = None) -> StepOutput:
    """A trained student (``result``: the loop's ``TrainResult``) in inference mode, with what restores it:
    its spec, parameter count, training history and, where it started from a selection, which teacher weights;
    ``source``: the model the recipe named (a transformers folder, a timm name), where it is not "same"/"tiny"."""
    student = finish(result.model)
    meta = {"student": spec, "params": sum(p.numel() for p in student.parameters()), "history": result.history}
    if source is not None and source not in STUDENT_CHOICES:
        meta["student_from"] = source
    if selected is not None:
        meta["selected"] = selected
    return StepOutput(student, meta)


def finish(student: nn.Module) -> nn.Module:
    """Inference mode: eval, and a distilled student averages its two heads."""
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(False)
    return student.cpu().eval()


@register_method(
    "distill",
    DistillConfig,
    family="distillation",
    summary="train a student from the teacher: soft / hard / DeiT distillation token (DeiT base, DeiT tiny)",
    restore=restore_student,
    supports="any teacher; students same/tiny need a timm ViT of plain blocks to copy",
    requires=needs_layout_teacher,
)
def distill(model: nn.Module, cfg: DistillConfig, ctx: Any) -> StepOutput:
    teacher = load_teacher(cfg, ctx, model)
    # "same"/"tiny" copy the teacher's ViT layout; a CNN teacher has none, so then the incoming
    # model's (the baseline's in a study): DeiT's setting, a ViT student taught by a convnet.
    layout = model if not isinstance(teacher, VisionTransformer) and isinstance(model, VisionTransformer) else teacher
    student, spec = build_student(cfg.student, layout, model, ctx, dist_token=cfg.uses_token,
                                  pretrained=cfg.pretrained, width=cfg.width, heads=cfg.heads,
                                  stem=cfg.stem, depth=cfg.depth, checkpoint=cfg.checkpoint)
    if student is teacher:
        raise VitcompressError("student 'input' is the teacher here; name a teacher (teacher: ARTIFACT_DIR)")
    selected = None
    if cfg.init_from_teacher and cfg.student == "same":
        init_from_teacher(student, teacher)
    elif cfg.init_from_teacher:
        selected = select_weights(student, layout)
    if cfg.loss == "deit":
        if not hasattr(student, "set_distilled_training"):
            raise VitcompressError(f"loss 'deit' needs a student with a distillation token; "
                                   f"{type(student).__name__} has none (use student same/tiny or a *_dist model)")
        student.set_distilled_training(True)
    loss_fn = make_distill_loss(cfg.loss, teacher, alpha=cfg.alpha, tau=cfg.tau, dist_target=cfg.dist_target,
                                label_smoothing=ctx.baseline_train.label_smoothing)
    result = ctx.fit(student, loss_fn=loss_fn, desc=f"{ctx.name} ({cfg.loss})", extra_modules=(teacher,),
                     **train_kwargs(cfg))
    return student_output(result, spec, selected, cfg.student)


__all__ = ["DistillConfig", "build_student", "check_student_weights", "check_width", "distill", "finish",
           "load_teacher", "needs_layout_teacher", "restore_student", "student_output", "train_kwargs"]

