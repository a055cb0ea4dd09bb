"""`vitcompress study --executor ray` on a local Ray instance gives the rows of the sequential run."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe_dict

from vitcompress.study import parse_recipe, run_study

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.usefixtures("needs_fmnist"), pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_matches_sequential(tmp_path, local_ray) -> None:
    d = tiny_recipe_dict()
    d["measure"]["threads"] = 1  # two tasks fit the two Ray CPUs at once
    d["experiments"].append({"name": "Per-tensor", "steps": [{"ptq.dynamic": {"per_channel": False}}]})
    recipe = parse_recipe(d)
    seq = run_study(recipe, tmp_path / "seq", progress=False, log=lambda m: None).rows
    par = run_study(recipe, tmp_path / "ray", progress=False, log=lambda m: None, executor="ray").rows
    key = ("name", "status", "top1", "size_bytes", "params", "int_arithmetic")
    as_set = lambda rows: sorted(tuple(r[k] for k in key) for r in rows)  # noqa: E731
    assert as_set(par) == as_set(seq)
    assert len(par) == 3
    # Resumable like the local executor: nothing left to run.
    again = run_study(recipe, tmp_path / "ray", progress=False, log=lambda m: None, executor="ray").rows
    assert as_set(again) == as_set(par)
