"""Which process am I, and how do the processes combine what each saw? For ``accelerate launch`` (N processes).

Every process trains (data-parallel, through accelerate); only the main process
writes artifacts, rows and reports, and the others wait for it at a barrier.

Statistics gathered outside training (calibration ranges, pruning importance)
are split the same way: each process takes its :func:`shard` of the batches and
the processes combine their statistics with :func:`all_reduce_` or
:func:`all_gather_object`, so that every process ends with the numbers one
process would get from all the batches. In a single process (torch.distributed
not initialized, or one process) the helpers do nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


def world_size() -> int:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def init_if_launched(mixed_precision: str) -> None:
    """Join the process group ``accelerate launch`` set up, so barriers work before the first training."""
    if world_size() > 1 and not (tdist.is_available() and tdist.is_initialized()):
        from .train import get_accelerator

        get_accelerator(mixed_precision)


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it.

    A process that exits with its gloo group still alive while another is still working can
    die in the group's C++ teardown ("terminate called without an active exception").
    """
    if tdist.is_available() and tdist.is_initialized():
        if tdist.get_world_size() > 1:
            tdist.barrier()
        tdist.destroy_process_group()


def shard(n: int, block: int = 1) -> range:
    """The contiguous part of ``range(n)`` this process takes (all of it in one process).

    The parts are contiguous and in rank order, so concatenated in rank order they
    are ``range(n)``: a statistic that depends on order (an EMA over batches) can be
    replayed in one process's order. Cuts fall on multiples of ``block`` (the batch
    size), so every process sees whole batches, the same batches one process would.
    The last process may get less, or nothing.
    """
    if not is_distributed():
        return range(n)
    blocks = -(-n // block)
    w, r = tdist.get_world_size(), tdist.get_rank()
    return range(min(blocks * r // w * block, n), min(blocks * (r + 1) // w * block, n))


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo (CPU runs, and the tests) moves CPU tensors.
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_(tensors: Sequence[torch.Tensor], op: Literal["sum", "min", "max"]) -> None:
    """Reduce ``tensors`` in place across processes, all of them in one collective.

    They travel as float64, which holds float32, float64 and integers below 2^53
    exactly, so ``min``/``max`` are exact and ``sum`` is float64 addition.
    """
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device(), torch.float64) for t in tensors])
    tdist.all_reduce(flat, op=getattr(tdist.ReduceOp, _OPS[op]))
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()


def all_gather_object(obj: T) -> list[T]:
    """Every process's ``obj`` (pickled between the study's own processes), in rank order; ``[obj]`` in one."""
    if not is_distributed():
        return [obj]
    out: list[T | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out  # type: ignore[return-value]
