"""Run a study's experiments in parallel as Ray tasks.

Ray schedules; we only say what depends on what. The baseline is built in the
driver first (every chain starts from it). Chain prefixes that two or more
pending experiments share are built next, shortest first, one task each, so a
shared prefix (DeiT base, then DeiT base + Dynamic Quantization) trains once.
Then each experiment is one task that loads its prefix, runs its last steps and
measures the result; its row comes back to the driver, which appends it to
``results.jsonl`` as rows arrive, so a killed study resumes as with the local
executor.

Each task asks for as many CPUs as the measurement uses threads (and a GPU when
training on one), so tasks on one machine never share cores while timing. On a
cluster, the run folder must be on a file system every node sees, and each
node's speed is its own: a row's ``env`` says where it was measured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import VitcompressError
from .recipe import Experiment, Recipe, Step


def _worker_study(recipe: Recipe, run_dir: str, data_root: str | None, download: bool) -> Any:
    from .runner import Study

    return Study(recipe, Path(run_dir), data_root=data_root, download=download, progress=False)


def _build_prefix(recipe: Recipe, run_dir: str, data_root: str | None, download: bool,
                  steps: tuple[Step, ...]) -> str:
    study = _worker_study(recipe, run_dir, data_root, download)
    _, art = study._materialize(steps)
    return str(art)


def _run_one(recipe: Recipe, run_dir: str, data_root: str | None, download: bool, exp: Experiment) -> dict[str, Any]:
    return _worker_study(recipe, run_dir, data_root, download).run_experiment(exp)


def shared_prefixes(experiments: list[Experiment]) -> list[tuple[Step, ...]]:
    """Chain prefixes (whole chains included) used by two or more experiments, shortest first."""
    counts: Counter[tuple[Step, ...]] = Counter()
    for exp in experiments:
        for n in range(1, len(exp.steps) + 1):
            counts[exp.steps[:n]] += 1
    return sorted((p for p, c in counts.items() if c >= 2), key=len)


def run_on_ray(study: Any, experiments: list[Experiment], address: str | None,
               record: Callable[[dict[str, Any]], None]) -> None:
    try:
        import ray
    except ImportError:
        raise VitcompressError("--executor ray needs Ray: pip install 'ray>=2.9'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        except Exception as exc:
            where = address or "a local Ray instance"
            raise VitcompressError(f"cannot start or reach {where}: {str(exc).splitlines()[0][:200]}; "
                                   "check --address (ray://HOST:10001 or HOST:6379)") from None
    cpus = study.recipe.measure.resolved_threads()
    gpus = 1 if torch.cuda.is_available() else 0
    args = (study.recipe, str(study.run_dir), study.data_root, study.download)
    build = ray.remote(num_cpus=cpus, num_gpus=gpus)(_build_prefix)
    run_one = ray.remote(num_cpus=cpus, num_gpus=gpus)(_run_one)

    prefixes = [p for p in shared_prefixes(experiments)
                if not (study._artifact_dir(p) / "meta.json").exists()]
    for length in sorted({len(p) for p in prefixes}):
        wave = [p for p in prefixes if len(p) == length]
        study.log(f"ray: building {len(wave)} shared prefix(es) of length {length}")
        ray.get([build.remote(*args, p) for p in wave])
    refs = {run_one.remote(*args, exp): exp for exp in experiments}
    for exp in experiments:
        study.log(f"▶ {exp.name} (ray task)")
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        exp = refs.pop(done[0])
        try:
            row = ray.get(done[0])
        except Exception as exc:  # the task itself crashed (a worker died, say): record it and go on
            row = study._failed_row(exp, f"ray task failed: {str(exc).splitlines()[0][:250]}", 0.0)
        record(row)
