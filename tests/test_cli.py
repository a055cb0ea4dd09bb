from __future__ import annotations

import subprocess
import sys
import warnings

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


def _one_line_error(argv: list[str], capsys) -> str:
    def to_stderr(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    # pytest records warnings; a user's shell shows them on stderr, next to the error line.
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("ignore", DeprecationWarning)  # Python's defaults outside __main__
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.showwarning = to_stderr
        assert main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_by_pickle",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Broken checkpoints for vitc_micro: truncated, corrupted, of another architecture, not a state dict, evil."""
    import pickle

    import torch
    from safetensors.torch import save_file

    from vitcompress.models import ModelSpec, create_model

    root = tmp_path_factory.mktemp("ckpt")
    state = {k: v.contiguous() for k, v in create_model(ModelSpec("vitc_micro")).state_dict().items()}
    save_file(state, str(root / "good.safetensors"))
    torch.save(state, root / "good.pth")
    good_st, good_pth = (root / "good.safetensors").read_bytes(), (root / "good.pth").read_bytes()
    files = {
        "truncated.safetensors": good_st[: len(good_st) // 2],
        "header-only.safetensors": good_st[:8],
        "truncated.pth": good_pth[: len(good_pth) // 2],
        "empty.pth": b"",
        "corrupt-header.safetensors": good_st[:8] + b"\xff" * 16 + good_st[24:],
        "garbage.pth": bytes(range(256)) * 4,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    quick = create_model(ModelSpec("vitc_quick")).state_dict()
    save_file({k: v.contiguous() for k, v in quick.items()}, str(root / "wrong-arch.safetensors"))
    torch.save(quick, root / "wrong-arch.pth")
    torch.save([1, 2, 3], root / "list.pth")
    with open(root / "evil.pth", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    return root


@pytest.mark.parametrize("name, expect", [
    ("truncated.safetensors", "cannot read checkpoint"), ("header-only.safetensors", "cannot read checkpoint"),
    ("truncated.pth", "cannot read checkpoint"),
    ("empty.pth", "cannot read checkpoint"),
    ("corrupt-header.safetensors", "cannot read checkpoint"), ("garbage.pth", "cannot read checkpoint"),
    ("wrong-arch.safetensors", "does not fit"), ("wrong-arch.pth", "does not fit"),
    ("list.pth", "no state dict"), ("evil.pth", "other than tensors"), ("missing.pth", "does not exist"),
])
def test_bad_checkpoints_on_the_command_line(checkpoints, name, expect, capsys, monkeypatch) -> None:
    monkeypatch.chdir(checkpoints)
    line = _one_line_error(["bench", "vitc_micro", "--checkpoint", str(checkpoints / name), "--no-progress"], capsys)
    assert expect in line and name in line
    assert not (checkpoints / "pwned_by_pickle").exists()


@pytest.mark.parametrize("damage", ["truncate", "header", "meta"])
def test_damaged_artifact_folder_on_the_command_line(tmp_path, damage, capsys) -> None:
    from vitcompress.artifact import save_artifact
    from vitcompress.models import ModelSpec, create_model

    art = tmp_path / "art"
    save_artifact(create_model(ModelSpec("vitc_micro")), art, {"model": ModelSpec("vitc_micro").to_dict(), "steps": []})
    weights = art / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "header":
        data = bytearray(weights.read_bytes())
        data[8:20] = b"\xff" * 12
        weights.write_bytes(bytes(data))
    else:
        (art / "meta.json").write_text("{not json")
    line = _one_line_error(["bench", str(art), "--no-progress"], capsys)
    # Caught by the hashes recorded when the artifact was written, before any byte is parsed.
    assert f"{art / ('meta.json' if damage == 'meta' else 'model.safetensors')} changed since it was written" in line


@pytest.mark.parametrize("argv", [["validate", "r" * 300], ["study", "r" * 300], ["report", "r" * 300]])
def test_names_too_long_for_the_file_system(tmp_path, monkeypatch, argv, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _one_line_error(argv, capsys)
