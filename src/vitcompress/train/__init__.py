"""Training and fine-tuning through HF accelerate.

One loop serves every method: baseline training, QAT, distillation and the
fine-tunes after pruning or low-rank swaps. A method passes its own
``loss_fn(model, x, y) -> loss``; the loop owns the optimizer (AdamW), the
warm-up + cosine schedule, gradient clipping, mixed precision, checkpoints and
resume. Under ``accelerate launch`` the same code runs data-parallel.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from ..errors import VitcompressError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
CKPT_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    # "auto": bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX) or a CUDA GPU, else fp32.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    augment: bool = True  # random crop + flip; short runs learn faster without
    train_subset: int | None = None  # train on this many images drawn once with the seed
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check(0 <= self.epochs <= 100_000, f"epochs must be in [0, 100000], got {self.epochs}")
        check(1 <= self.batch_size <= 65_536, f"batch_size must be in [1, 65536], got {self.batch_size}")
        check(0 < self.lr < 10, f"lr must be in (0, 10), got {self.lr}")
        check(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.warmup_epochs <= 100_000, f"warmup_epochs must be in [0, 100000], got {self.warmup_epochs}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        check(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1 or null")
        check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch must be >= 1")


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


class TrainingDiverged(VitcompressError):
    """The loss became NaN or infinite."""


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "no"
    except AttributeError:
        return "no"


def get_accelerator(mixed_precision: str = "no") -> Any:
    """An ``accelerate.Accelerator`` for this process, re-created when the precision changes.

    accelerate keeps one global state per process and refuses a second precision;
    a study trains several models, possibly with different precisions, so the
    non-distributed part of that state is reset between them.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _strip_accelerate(model: nn.Module, forward: Any) -> None:
    """Remove what ``accelerate.prepare`` leaves on a model, and give it ``forward`` back.

    accelerate marks a model it prepared (``_is_accelerate_prepared``) and from then on returns it
    unmoved, and under mixed precision it replaces ``forward`` with an autocast wrapper; both
    outlive ``unwrap_model``. A model trained twice (gates then fine-tune, or a chain's second
    training step on a deep copy) then stayed on the CPU on a GPU machine, and every later forward
    of a trained model ran under bf16 autocast. ``forward`` is the instance-level forward the model
    had before training (``None``: the class's).
    """
    d = vars(model)
    d.pop("_is_accelerate_prepared", None)
    d.pop("_original_forward", None)
    if forward is None:
        d.pop("forward", None)
    else:
        d["forward"] = forward


def default_loss(label_smoothing: float) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    return loss_fn


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` (per optimizer step)."""
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on norms, biases, tokens and position embeddings (as timm and DeiT do).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith((".bias", "cls_token", "pos_embed", "dist_token", "reg_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                     history: list[dict[str, float]], seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "step": step,
        "history": json.dumps(history),
        "seconds": seconds,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A corrupt checkpoint loses one epoch at most: start that training again rather than fail.
        import warnings

        warnings.warn(f"ignoring unreadable training checkpoint {path}; training restarts", stacklevel=2)
        return None


@contextlib.contextmanager
def _deterministic_cudnn() -> Any:
    """cuDNN's deterministic convolution algorithms while training, the previous setting after.

    Same recipe and seed should give the same weights on a GPU as they do on the CPU; left to its
    heuristics cuDNN may pick backward algorithms for the conv stem / patch projection that add
    with atomics, in a different order each run. No effect without cuDNN.
    """
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@_deterministic_cudnn()  # a contextmanager is also a decorator: each call of fit enters it
def fit(
    model: nn.Module,
    train_ds: Any,
    cfg: TrainConfig,
    *,
    work_dir: str | os.PathLike,
    img_size: int,
    in_chans: int,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    desc: str = "train",
    progress: bool = True,
    extra_modules: tuple[nn.Module, ...] = (),
    train_log: Any = None,
) -> TrainResult:
    """Train ``model`` on ``train_ds`` (a split in memory or streamed, see ``vitcompress.data``); resume from
    ``work_dir`` if a checkpoint is there.

    ``extra_modules`` (a teacher, say) are moved to the training device but not trained. ``train_log``
    (a ``vitcompress.track.TrainLog``) gets each step's loss and learning rate and each epoch's end.
    Returns the trained model on CPU, in eval mode.
    """
    from tqdm.auto import tqdm

    from ..data import make_loader

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / CKPT_FILE
    loss_fn = loss_fn or default_loss(cfg.label_smoothing)
    if cfg.epochs == 0:
        return TrainResult(model.cpu().eval())

    if cfg.train_subset is not None and cfg.train_subset < len(train_ds):
        g = torch.Generator().manual_seed(seed)
        train_ds = train_ds.subset(torch.randperm(len(train_ds), generator=g)[: cfg.train_subset])

    accelerator = get_accelerator(resolve_mixed_precision(cfg.mixed_precision))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))

    history: list[dict[str, float]] = []
    start_epoch, step, seconds_before = 0, 0, 0.0
    state = _load_checkpoint(ckpt_path)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = json.loads(state["history"])
        seconds_before = float(state["seconds"])

    own_forward = vars(model).get("forward")
    _strip_accelerate(model, own_forward)  # unmarked, prepare places it on the device
    model, opt = accelerator.prepare(model, opt)
    for extra in extra_modules:
        extra.to(accelerator.device).eval()

    world = accelerator.num_processes
    per_epoch = len(train_ds) // (cfg.batch_size * world)
    if cfg.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    if per_epoch < 1:
        raise VitcompressError(
            f"{len(train_ds)} training images are fewer than one batch of {cfg.batch_size} x {world} processes; "
            "lower train.batch_size"
        )
    total = per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * per_epoch))
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        # Every process draws the same global batch (seeded by epoch) and keeps its own slice, so
        # N processes see exactly the batches one process would at batch_size x N.
        loader = make_loader(train_ds, cfg.batch_size * world, train=True, img_size=img_size,
                             in_chans=in_chans, seed=seed, epoch=epoch, augment=cfg.augment)
        rank = accelerator.process_index
        bar = tqdm(total=per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (progress and accelerator.is_main_process), mininterval=1.0)
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = 0
        for i, (x, y) in enumerate(loader):
            if i >= per_epoch:
                break
            x = x[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].to(accelerator.device, non_blocking=True)
            y = y[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].to(accelerator.device, non_blocking=True)
            lr = lr_at(step, total, warmup, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            # The whole loss under autocast, not only the prepared model's forward: a teacher
            # (distillation) or a reference model called inside loss_fn runs in bf16 too.
            with accelerator.autocast():
                loss = loss_fn(model, x, y)
            finite = bool(torch.isfinite(loss.detach()))
            # Read here, where the check above has already waited for it (after opt.step() it would wait for
            # the backward pass and the update too).
            logged_loss = loss.item() if train_log is not None else 0.0
            if world > 1:
                # Every process must stop together: one that raised alone would leave the others
                # waiting forever in the next gradient all-reduce.
                bad = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
                finite = accelerator.reduce(bad, reduction="sum").item() == 0
            if not finite:
                raise TrainingDiverged(
                    f"{desc}: loss became {loss.item()} at epoch {epoch + 1} step {i + 1}; "
                    "lower the learning rate (train.lr) or turn off mixed precision"
                )
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            if train_log is not None and accelerator.is_main_process:
                train_log.step(step, logged_loss, lr)
            if i % 20 == 0 or i == per_epoch - 1:
                bar.set_postfix(loss=f"{(loss_sum / max(seen, 1)).item():.4f}", lr=f"{lr:.2e}")
            bar.update(1)
        bar.close()
        epoch_loss = accelerator.reduce(loss_sum, reduction="sum").item() / max(1, seen * world)
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "lr": lr})
        if train_log is not None and accelerator.is_main_process:
            train_log.epoch(epoch + 1, accelerator.unwrap_model(model), epoch_loss)
            model.train()
        if accelerator.is_main_process:
            _save_checkpoint(ckpt_path, accelerator.unwrap_model(model), opt, epoch + 1, step, history,
                             seconds_before + time.perf_counter() - t0)
        accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    _strip_accelerate(model, own_forward)
    model = model.cpu().eval()
    for extra in extra_modules:
        extra.cpu()
    return TrainResult(model, history, seconds_before + time.perf_counter() - t0, start_epoch)
