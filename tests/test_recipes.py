from __future__ import annotations

import copy

import pytest
import yaml
from conftest import tiny_recipe_dict

from vitcompress.errors import VitcompressError
from vitcompress.study import bundled_recipes, load_recipe, parse_recipe


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_bundled_recipe_validates(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.baseline.name
    assert all(exp.steps for exp in recipe.experiments)


def test_quick_is_the_default_and_has_dynamic_quantization() -> None:
    recipe = load_recipe("quick")
    assert recipe.data.name == "fashion-mnist"
    assert "ptq.dynamic" in {s.method for e in recipe.experiments for s in e.steps}


def _err(data: dict) -> str:
    with pytest.raises(VitcompressError) as exc:
        parse_recipe(data, "r.yaml")
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_keys_are_rejected_everywhere() -> None:
    d = tiny_recipe_dict(extra=1)
    assert "unknown key 'extra'" in _err(d)
    d = tiny_recipe_dict()
    d["baseline"]["train"]["epochz"] = 3
    assert "baseline.train: unknown key 'epochz'" in _err(d)
    d = tiny_recipe_dict()
    d["experiments"][0]["steps"][0]["ptq.dynamic"] = {"bitz": 4}
    assert "experiments[0].steps[0].ptq.dynamic: unknown key 'bitz'" in _err(d)


def test_an_experiment_note_is_one_line_of_text() -> None:
    d = tiny_recipe_dict()
    d["experiments"][0]["note"] = "a smoke row:\n  one epoch"
    assert parse_recipe(d).experiments[0].note == "a smoke row: one epoch"
    d["experiments"][0]["note"] = 3
    assert "experiments[0]: 'note' must be a string" in _err(d)


def test_wrong_types_and_ranges() -> None:
    d = tiny_recipe_dict()
    d["baseline"]["train"]["epochs"] = "three"
    assert "expected an integer" in _err(d)
    d = tiny_recipe_dict()
    d["baseline"]["train"]["lr"] = -1
    assert "lr must be in" in _err(d)
    d = tiny_recipe_dict()
    d["measure"]["batch_size"] = 0
    assert "batch_size" in _err(d)
    d = tiny_recipe_dict(seed=True)
    assert "seed" in _err(d)


def test_unknown_method_model_dataset() -> None:
    d = tiny_recipe_dict()
    d["experiments"][0]["steps"] = [{"os.system": {}}]
    assert "unknown method 'os.system'" in _err(d)
    d = tiny_recipe_dict()
    d["baseline"]["model"] = "not_a_model"
    assert "unknown model 'not_a_model'" in _err(d)
    d = tiny_recipe_dict()
    d["data"]["name"] = "imagenet"
    assert "unknown dataset" in _err(d)


def test_a_step_after_integer_weights_is_rejected() -> None:
    d = tiny_recipe_dict()
    d["experiments"][0]["steps"] = [{"ptq.dynamic": {}}, {"ptq.dynamic": {}}]
    msg = _err(d)
    assert "cannot follow 'ptq.dynamic', which produced integer weights" in msg


def test_duplicate_experiment_names() -> None:
    d = tiny_recipe_dict()
    d["experiments"].append(copy.deepcopy(d["experiments"][0]))
    assert "used twice" in _err(d)


def test_shorthand_method_params_equals_steps() -> None:
    a = parse_recipe(tiny_recipe_dict())
    d = tiny_recipe_dict()
    d["experiments"] = [{"name": "Dynamic Quantization", "method": "ptq.dynamic", "params": {}}]
    b = parse_recipe(d)
    assert a.experiments == b.experiments
    assert a.prefix_key(a.experiments[0].steps) == b.prefix_key(b.experiments[0].steps)


def test_prefix_keys_depend_on_baseline_and_steps() -> None:
    a = parse_recipe(tiny_recipe_dict())
    d = tiny_recipe_dict()
    d["baseline"]["train"]["epochs"] = 3
    b = parse_recipe(d)
    steps = a.experiments[0].steps
    assert a.prefix_key(steps) != b.prefix_key(steps)
    assert a.prefix_key(()) != a.prefix_key(steps)


def test_a_late_option_at_its_default_keeps_cache_keys_and_finished_rows() -> None:
    from vitcompress.config import to_dict
    from vitcompress.study.runner import _step_keys

    d = tiny_recipe_dict()
    d["experiments"] = [{"name": "P", "steps": [{"prune.structured": {"ratio": 0.2}}]},
                        {"name": "P stem", "steps": [{"prune.structured": {"ratio": 0.2, "stem": True}}]}]
    r = parse_recipe(d)
    plain, stem = r.experiments[0].steps, r.experiments[1].steps
    assert "stem" in plain[0].to_dict()["config"]  # rows and artifacts record every option
    assert "stem" not in plain[0].key_dict()["config"] and stem[0].key_dict()["config"]["stem"] is True
    assert r.prefix_key(plain) != r.prefix_key(stem)
    # A row written before the option existed has the key of the option at its default: it is not re-run.
    before = plain[0].to_dict()
    del before["config"]["stem"]
    assert _step_keys([before]) == [plain[0].key_dict()] != _step_keys([stem[0].to_dict()])
    # A stored option that no longer exists makes the row stale instead of failing.
    assert _step_keys([{"method": "prune.structured", "config": {**to_dict(plain[0].config), "gone": 1}}]) is None


def test_yaml_errors_are_one_line(tmp_path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nbaseline: [unclosed\n")
    with pytest.raises(VitcompressError) as exc:
        load_recipe(p)
    assert "not valid YAML" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(VitcompressError, match="unknown recipe"):
        load_recipe("no-such-recipe")
    p2 = tmp_path / "ok.yaml"
    p2.write_text(yaml.safe_dump(tiny_recipe_dict()))
    assert load_recipe(p2).name == "tiny"
