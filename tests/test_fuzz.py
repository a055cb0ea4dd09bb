"""Bad input, fuzzed: every malformed recipe or file ends in a one-line VitcompressError, nothing else."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from conftest import tiny_recipe_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vitcompress.artifact import load_artifact, save_artifact
from vitcompress.errors import VitcompressError
from vitcompress.models import ModelSpec, create_model, load_weights
from vitcompress.study import parse_recipe

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
PATHS = [
    ("name",), ("seed",), ("description",), ("data",), ("data", "name"), ("data", "calib_images"),
    ("baseline",), ("baseline", "model"), ("baseline", "img_size"), ("baseline", "in_chans"),
    ("baseline", "train"), ("baseline", "train", "epochs"), ("baseline", "train", "lr"),
    ("baseline", "train", "batch_size"), ("baseline", "train", "mixed_precision"), ("measure",),
    ("measure", "batch_size"), ("measure", "threads"), ("experiments",), ("experiments", 0),
    ("experiments", 0, "name"), ("experiments", 0, "steps"), ("experiments", 0, "steps", 0),
    ("experiments", 0, "steps", 0, "ptq.dynamic"), ("experiments", 0, "steps", 0, "ptq.dynamic", "per_channel"),
]


def _set(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), JUNK), min_size=1, max_size=3))
def test_mutated_recipes_parse_or_fail_with_one_line(mutations) -> None:
    d = tiny_recipe_dict()
    for path, value in mutations:
        try:
            _set(d, path, copy.deepcopy(value))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced a parent: the recipe is broken another way
    try:
        parse_recipe(d)
    except VitcompressError as exc:
        assert "\n" not in str(exc) and str(exc)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30), st.one_of(JUNK, st.just({})))
def test_unknown_methods_and_keys(method, params) -> None:
    d = tiny_recipe_dict()
    d["experiments"][0]["steps"] = [{method: params}]
    try:
        parse_recipe(d)
    except VitcompressError as exc:
        assert "\n" not in str(exc)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


@pytest.fixture
def artifact(tmp_path):
    model = create_model(ModelSpec("vitc_micro"))
    save_artifact(model, tmp_path / "art", {"model": ModelSpec("vitc_micro").to_dict(), "steps": []})
    return tmp_path / "art"


@pytest.mark.parametrize("cut", [0, 7, 100, -10])
def test_truncated_artifacts_fail_cleanly(artifact, cut) -> None:
    path = artifact / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(VitcompressError, match="corrupt or truncated|does not match"):
        load_artifact(artifact)


def test_corrupted_bytes_and_meta(artifact) -> None:
    path = artifact / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12  # break the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(VitcompressError):
        load_artifact(artifact)
    (artifact / "meta.json").write_text("{not json")
    with pytest.raises(VitcompressError, match="corrupt"):
        load_artifact(artifact)


def test_pickles_that_run_code_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    model = create_model(ModelSpec("vitc_micro"))
    with pytest.raises(VitcompressError, match="cannot read checkpoint"):
        load_weights(model, evil)
    with pytest.raises(VitcompressError, match="cannot read checkpoint"):
        create_model(ModelSpec("vitc_micro", checkpoint=str(evil)))
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_checkpoint_of_the_wrong_architecture(tmp_path) -> None:
    other = create_model(ModelSpec("vitc_quick"))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "quick.safetensors"))
    torch.save(other.state_dict(), tmp_path / "quick.pth")
    for name in ("quick.safetensors", "quick.pth"):
        with pytest.raises(VitcompressError, match="does not fit"):
            create_model(ModelSpec("vitc_micro", checkpoint=str(tmp_path / name)))
        with pytest.raises(VitcompressError, match="does not fit"):
            load_weights(create_model(ModelSpec("vitc_micro")), tmp_path / name)


def test_checkpoint_that_is_not_a_state_dict(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(VitcompressError, match="no state dict"):
        load_weights(create_model(ModelSpec("vitc_micro")), tmp_path / "list.pth")
    with pytest.raises(VitcompressError, match="does not exist"):
        load_weights(create_model(ModelSpec("vitc_micro")), tmp_path / "missing.pth")


def test_offline_pretrained_weights_from_a_local_file(tmp_path) -> None:
    src = create_model(ModelSpec("vitc_micro", num_classes=10))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    # Another class count: the backbone loads, the head is re-initialised.
    model = create_model(ModelSpec("vitc_micro", num_classes=7, checkpoint=str(tmp_path / "w.safetensors")))
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 7
