"""Which process am I? For studies run under ``accelerate launch`` (one study, N processes).

Every process trains (data-parallel, through accelerate); only the main process
writes artifacts, rows and reports, and the others wait for it at a barrier.
"""

from __future__ import annotations

import os

import torch.distributed as tdist


def world_size() -> int:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def init_if_launched(mixed_precision: str) -> None:
    """Join the process group ``accelerate launch`` set up, so barriers work before the first training."""
    if world_size() > 1 and not (tdist.is_available() and tdist.is_initialized()):
        from .train import get_accelerator

        get_accelerator(mixed_precision)
