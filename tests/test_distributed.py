"""The training loop under `accelerate launch`: 2 CPU processes (gloo) follow the single-process loss curve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "32"], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(tmp_path / "two"),
                            "16"], capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "hist.json").read_text())
    two = json.loads((tmp_path / "two" / "hist.json").read_text())
    assert len(one) == len(two) == 2
    # Same data, same global batch, averaged gradients: equal up to float summation order.
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-2


@pytest.mark.slow
def test_a_whole_study_under_accelerate_launch_writes_each_row_once(tmp_path) -> None:
    import yaml
    from conftest import FMNIST, tiny_recipe_dict

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict()))
    res = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vitcompress", "study",
                          str(recipe), "--out", str(tmp_path / "run"), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["Vanilla ViT", "Dynamic Quantization"]
    assert all(r["status"] == "ok" for r in rows)
