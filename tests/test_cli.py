from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import tiny_recipe_dict

from vitcompress.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitcompress", *args], capture_output=True, text=True, timeout=120)


def test_list_shows_registered_methods_presets_and_recipes(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ptq.dynamic" in out and "vitc_quick" in out and "quick" in out


def test_validate_every_bundled_recipe(capsys) -> None:
    assert main(["validate", "quick", "fashion-mnist", "cifar10", "cifar100"]) == 0
    assert capsys.readouterr().out.count(": ok") == 4


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d.update(bogus=1), "unknown key 'bogus'"),
        (lambda d: d["baseline"].update(model="nope"), "unknown model 'nope'"),
        (lambda d: d["experiments"][0].update(steps=[{"ptq.dynamic": {}}, {"ptq.dynamic": {}}]), "integer weights"),
    ],
)
def test_bad_recipes_end_in_one_line_and_exit_2(tmp_path, mutate, expect) -> None:
    d = tiny_recipe_dict()
    mutate(d)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    res = _run("validate", str(p))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    assert "Traceback" not in res.stderr


def test_missing_things_are_one_line_errors(tmp_path) -> None:
    for args in (["study", "no-such-recipe"], ["report", str(tmp_path)], ["study", str(tmp_path / "x.yaml")]):
        res = _run(*args)
        assert res.returncode == 2, args
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_missing_dataset_root_says_how_to_get_it(tmp_path) -> None:
    d = tiny_recipe_dict()
    d["data"] = {"name": "cifar10", "root": str(tmp_path / "nothing")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    res = _run("study", str(p), "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "CIFAR" in res.stderr
