"""Recipes: YAML parsed into typed configs, validated before anything runs.

A recipe names a dataset, a baseline model (and how to get it: train it, load
a checkpoint, or fine-tune pretrained weights), how to measure, and a list of
experiments. An experiment is a chain of registered method steps; each step
receives the model the previous one produced. Rules checked here:

* unknown keys, wrong types and out-of-range values are errors naming the path;
* only registered methods and models may be named (no import paths);
* no step may follow a step that produced integer weights (nothing trains or
  restructures an int8 model): quantization comes last.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import LATE, check, from_dict, key_dict
from ..data import DATASETS, DataConfig
from ..errors import VitcompressError, not_a_file
from ..measure import MeasureConfig
from ..methods import Step, get_method, load_builtin_methods, parse_steps
from ..models import ModelSpec, input_shape, is_known_model, structure_of, unknown_model_error
from ..models.arch import machine_memory, memory_need
from ..track import TrackingConfig
from ..train import TrainConfig


@dataclass(frozen=True)
class BaselineConfig:
    # A preset, a timm name (a pretrained tag allowed), hf-hub:org/name, or a transformers ViT/DeiT folder.
    model: str
    name: str = "Vanilla ViT"
    pretrained: bool = False
    checkpoint: str | None = None
    img_size: int | None = None  # None: the preset's own size; a transformers model's; a timm model's (224)
    in_chans: int | None = None  # None: the dataset's channels for presets, 3 (or the config's) for the others
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Input recipe: "model" (the model's own: timm's pretrained config, a transformers preprocessor_config),
    # "dataset" (the training split's statistics), "auto" (the model's where it brings weights, else the data's).
    preprocess: Literal["auto", "model", "dataset"] = field(default="auto", metadata=LATE)

    def __post_init__(self) -> None:
        if not is_known_model(self.model):
            raise unknown_model_error(self.model)
        check(self.img_size is None or 8 <= self.img_size <= 1024, "img_size must be in [8, 1024]")
        check(self.in_chans in (None, 1, 3), "in_chans must be 1 or 3")


@dataclass(frozen=True)
class Experiment:
    name: str
    steps: tuple[Step, ...]
    note: str = ""  # shown under the report's table: how to read this row (a smoke budget, say)

    @property
    def method(self) -> str:
        return "+".join(s.method for s in self.steps) or "baseline"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    seed: int
    data: DataConfig
    baseline: BaselineConfig
    measure: MeasureConfig
    experiments: tuple[Experiment, ...]
    source: str = ""
    search: Any = None  # vitcompress.search.SearchConfig, for `vitcompress search`
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # experiment tracking (off by default)

    def model_spec(self, num_classes: int | None = None, data_channels: int | None = None) -> ModelSpec:
        """The baseline as the recipe names it, its input size and channels resolved; the class count and
        the images' channels come from the data (known for the bundled datasets)."""
        b = self.baseline
        if num_classes is None or data_channels is None:
            if self.data.name not in DATASETS:
                raise VitcompressError(f"the class count of {self.data.name} data comes from the files; open the "
                                       "data first (vitcompress.data.open_source)")
            info = DATASETS[self.data.name]
            num_classes, data_channels = info.num_classes, info.in_chans
        img, chans = input_shape(b.model, b.img_size, b.in_chans, data_channels)
        return ModelSpec(b.model, num_classes, img, chans, b.pretrained, b.checkpoint, dict(b.model_kwargs))

    def baseline_key(self) -> str:
        """Fingerprint of everything the baseline depends on (options added later count only when set)."""
        return _digest({"data": key_dict(self.data) | {"root": None}, "baseline": key_dict(self.baseline),
                        "seed": self.seed})

    def prefix_key(self, steps: tuple[Step, ...]) -> str:
        """Fingerprint of the baseline plus a chain prefix: equal prefixes share one artifact."""
        return _digest({"baseline": self.baseline_key(), "steps": [s.key_dict() for s in steps]})


_TOP_KEYS = {"name", "description", "seed", "data", "baseline", "measure", "experiments", "search", "tracking"}
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_. -]{0,99}")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _parse_experiment(raw: Any, where: str) -> Experiment:
    if not isinstance(raw, dict):
        raise VitcompressError(f"{where}: an experiment is a mapping with 'name' and 'steps'")
    unknown = set(raw) - {"name", "steps", "method", "params", "note"}
    if unknown:
        raise VitcompressError(f"{where}: unknown key '{sorted(unknown)[0]}'; allowed: name, steps (or method, "
                               "params), note")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise VitcompressError(f"{where}: 'name' must be a non-empty string")
    if "steps" in raw and "method" in raw:
        raise VitcompressError(f"{where}: give either 'steps' or 'method', not both")
    if "method" in raw:
        steps_raw: Any = [{raw["method"]: raw.get("params") or {}}]
    elif "params" in raw:
        raise VitcompressError(f"{where}: 'params' needs 'method'")
    else:
        steps_raw = raw.get("steps")
    note = raw.get("note") or ""
    if not isinstance(note, str):
        raise VitcompressError(f"{where}: 'note' must be a string (one line on how to read the row)")
    return Experiment(name.strip(), parse_steps(steps_raw, f"{where}.steps"), " ".join(note.split()))


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """A validated :class:`Recipe` from the mapping a YAML file holds."""
    load_builtin_methods()  # method families also register model presets (e.g. distillation students)
    if not isinstance(data, dict):
        raise VitcompressError(f"{source}: a recipe is a YAML mapping with keys {', '.join(sorted(_TOP_KEYS))}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise VitcompressError(f"{source}: unknown key '{sorted(unknown, key=str)[0]}'; allowed keys: "
                               f"{', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "baseline"):
        if key not in data:
            raise VitcompressError(f"{source}: missing required key '{key}'")
    name = data["name"]
    # The name is the default run folder (runs/<name>): a path of one plain component, nothing that leaves runs/.
    if not isinstance(name, str) or not _RECIPE_NAME.fullmatch(name.strip()) or name.strip() in (".", ".."):
        raise VitcompressError(f"{source}: 'name' must be letters, digits, spaces and . _ - (not starting with . "
                               f"or -, at most 100 characters); it names the run folder runs/<name>; got {name!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise VitcompressError(f"{source}: 'seed' must be an integer in [0, 2**32), got {seed!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise VitcompressError(f"{source}: 'description' must be a string")
    data_cfg = from_dict(DataConfig, data.get("data"), f"{source}: data")
    baseline = from_dict(BaselineConfig, data["baseline"], f"{source}: baseline")
    measure = from_dict(MeasureConfig, data.get("measure"), f"{source}: measure")
    raw_exps = data.get("experiments") or []
    if not isinstance(raw_exps, list):
        raise VitcompressError(f"{source}: 'experiments' must be a list")
    experiments = tuple(_parse_experiment(e, f"{source}: experiments[{i}]") for i, e in enumerate(raw_exps))
    names = [baseline.name] + [e.name for e in experiments]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise VitcompressError(f"{source}: experiment name '{dup}' is used twice; names must be unique")
    search = None
    if data.get("search") is not None:
        from ..search.space import parse_search

        search = parse_search(data["search"], f"{source}: search")
    tracking = from_dict(TrackingConfig, data.get("tracking"), f"{source}: tracking")
    recipe = Recipe(name.strip(), description, seed, data_cfg, baseline, measure, experiments, source, search,
                    tracking)
    check_models(recipe)
    return recipe


def check_models(recipe: Recipe) -> None:
    """Say no early: every local checkpoint a recipe names exists, and every step can run on the model it gets.

    The baseline (and any student a step swaps in) is built on the meta device, structure only, and each
    method's requirement is asked of it; a pair that cannot run is one line naming the method and the
    architecture, before any work. Models that only the hub can describe are checked when loaded.
    """
    b = recipe.baseline
    paths = [(f"{recipe.source}: baseline.checkpoint", b.checkpoint)]
    for i, exp in enumerate(recipe.experiments):
        for j, step in enumerate(exp.steps):
            paths.append((f"{recipe.source}: experiments[{i}].steps[{j}].{step.method}.checkpoint",
                          getattr(step.config, "checkpoint", None)))
    for where, path in paths:
        problem = None if path is None else not_a_file(Path(path).expanduser())
        if problem is not None:
            raise VitcompressError(f"{where}: {path} {problem}; pass the path of a .safetensors or .pth file")
    if b.train.epochs == 0:
        for i, exp in enumerate(recipe.experiments):
            for j, step in enumerate(exp.steps):
                cfg = step.config
                if hasattr(cfg, "epochs") and getattr(cfg, "student", "input") != "input" and cfg.epochs is None:
                    raise VitcompressError(
                        f"{recipe.source}: experiments[{i}] ({exp.name}) step {j + 1}: {step.method} trains its "
                        "student as many epochs as the baseline trained, and baseline.train.epochs is 0 (the model is "
                        f"evaluated as it is); set {step.method}.epochs")
    info = DATASETS.get(recipe.data.name)
    spec = recipe.model_spec(info.num_classes if info else 10, info.in_chans if info else 3)
    base = structure_of(spec.name, num_classes=spec.num_classes, img_size=spec.img_size, in_chans=spec.in_chans,
                        kwargs=spec.kwargs)
    if base is None:
        return
    need, why = memory_need(base, train_batch=b.train.batch_size if b.train.epochs else None,
                            eval_batch=recipe.measure.eval_batch_size)
    if need > machine_memory():
        raise VitcompressError(
            f"{recipe.source}: baseline {spec.name} at {spec.img_size} px would need about {need / 1e9:,.0f} GB "
            f"({why}), more than this machine's {machine_memory() / 1e9:.0f} GB; lower img_size, the model's size "
            "(model_kwargs) or the batch sizes")
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    seen: dict[tuple[int, str, str], str | None] = {}
    for i, exp in enumerate(recipe.experiments):
        model, label = base, spec.name
        for j, step in enumerate(exp.steps):
            method = get_method(step.method)
            key = (id(model), step.method, f"{getattr(step.config, 'student', '')}|{getattr(step.config, 'teacher', '')}")
            if key not in seen:
                seen[key] = method.problem(model, step.config, shape)
            if seen[key]:
                raise VitcompressError(f"{recipe.source}: experiments[{i}] ({exp.name}) step {j + 1}: {step.method} "
                                       f"cannot run on {label}: {seen[key]}")
            student = getattr(step.config, "student", None)
            if isinstance(student, str) and student not in ("same", "tiny", "input"):
                model = structure_of(student, num_classes=spec.num_classes, img_size=spec.img_size,
                                     in_chans=spec.in_chans)
                label = student
                if model is None:
                    break


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: a 1 kB recipe of aliases of aliases (a "billion laughs") expands
    to billions of nodes the moment a key is read. A recipe has no need for them; anchors alone are harmless."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "recipes may not use YAML aliases (*name); write the "
                                              "value out", event.start_mark)
        return super().compose_node(parent, index)


def bundled_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("vitcompress.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a bundled recipe by name (``quick``) or a YAML file by path."""
    text: str
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise VitcompressError(f"recipe file {path} not found; bundled recipes: {', '.join(bundled_recipes())}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise VitcompressError(f"cannot read recipe {path}: {exc}") from None
        source = str(path)
    else:
        name = str(name_or_path)
        if name not in bundled_recipes():
            raise VitcompressError(f"unknown recipe '{name}'; bundled recipes: {', '.join(bundled_recipes())}, "
                                   "or pass the path of a .yaml file")
        text = resources.files("vitcompress.recipes").joinpath(f"{name}.yaml").read_text()
        source = name
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise VitcompressError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, source)
