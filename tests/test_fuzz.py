"""Bad input, fuzzed: every malformed recipe or file ends in a one-line VitcompressError, nothing else."""

from __future__ import annotations

import copy
import json
import os
import pickle
import time

import numpy as np
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
    # The hashes recorded at write time catch it first; without them, the reader fails cleanly too.
    with pytest.raises(VitcompressError, match="model.safetensors changed since it was written"):
        load_artifact(artifact)
    with pytest.raises(VitcompressError, match="corrupt or truncated|does not match"):
        load_artifact(artifact, verify=False)


def test_corrupted_bytes_and_meta(artifact) -> None:
    path = artifact / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12  # break the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(VitcompressError, match="changed since it was written"):
        load_artifact(artifact)
    with pytest.raises(VitcompressError):
        load_artifact(artifact, verify=False)
    (artifact / "meta.json").write_text("{not json")
    with pytest.raises(VitcompressError, match="corrupt"):
        load_artifact(artifact, verify=False)


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


# ---- bad command lines ---------------------------------------------------------------------------------------
SUBCOMMANDS = ("study", "search", "report", "list", "bench", "validate")
BUNDLED = ("quick", "fashion-mnist", "cifar10", "cifar100")
# Prepared in the fuzz's working folder: a directory named like a recipe, binary junk, YAML that is no recipe.
BAD_FILES = {"bin.yaml": b"\xff\xfe\x00\x81junk", "list.yaml": b"- 1\n- 2\n", "empty.yaml": b"",
             "broken.yaml": b"a: [1,\n", "scalar.yml": b"42\n", "recipe.txt": b"name: x\n"}
BAD_PATHS = [*BAD_FILES, "dir.yaml", "missing.yaml", "no/such/dir/r.yaml", ".", "..", "/", "/dev/null", ""]

# Argument text a shell could pass (no NUL, no lone surrogates); no newlines either, since errors quote the
# argument and a newline in it would split the line. Free tokens never start with "-": argparse expands
# unambiguous prefixes ("--deb" is --debug, "-h" prints help and exits 0), which is not bad input.
TOKEN = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"), max_size=16)
WORD = TOKEN.filter(lambda s: not s.startswith("-"))
RECIPE = st.one_of(WORD.filter(lambda s: s not in BUNDLED), st.sampled_from(BAD_PATHS))
UNKNOWN_FLAG = st.one_of(TOKEN.map(lambda s: "--zz" + s), WORD.map(lambda s: "-Z" + s))


def _fails(parse: type, s: str) -> bool:
    try:
        parse(s)
    except (ValueError, OverflowError):
        return True
    return False


NOT_INT = TOKEN.filter(lambda s: _fails(int, s) and not s.startswith("-"))
NOT_FLOAT = TOKEN.filter(lambda s: _fails(float, s) and not s.startswith("-"))
NOT_CHOICE = WORD.filter(lambda s: s not in ("local", "ray", "cpu", "cuda", "auto"))
OUT_OPTS = st.lists(st.tuples(st.sampled_from(["--out", "--data-root"]), WORD), max_size=2).map(
    lambda pairs: [x for pair in pairs for x in pair])


@st.composite
def bad_argv(draw) -> list[str]:
    """An argv that cannot run: unknown subcommand or flag, bad path, garbage recipe, non-numeric value."""
    case = draw(st.sampled_from(["subcommand", "flag", "recipe", "number", "choice", "report", "missing", "extra"]))
    if case == "subcommand":
        return [draw(WORD.filter(lambda s: s not in SUBCOMMANDS)), *draw(st.lists(WORD, max_size=3))]
    if case == "flag":
        sub = draw(st.sampled_from(SUBCOMMANDS))
        positional = {"list": []}.get(sub, [draw(RECIPE)])
        return [sub, *positional, draw(UNKNOWN_FLAG)]
    if case == "recipe":
        sub = draw(st.sampled_from(["study", "search", "validate"]))
        extra = draw(OUT_OPTS) if sub != "validate" else []
        return [sub, draw(RECIPE), *extra]
    if case == "number":
        return draw(st.sampled_from([
            ["search", draw(st.sampled_from(["quick", draw(RECIPE)])), "--trials", draw(NOT_INT)],
            ["bench", "vitc_micro", draw(st.sampled_from(["--threads", "--repeats", "--warmup", "--latency-samples",
                                                          "--img-size", "--in-chans", "--num-classes"])),
             draw(NOT_INT)],
            ["bench", "vitc_micro", "--min-repeat-seconds", draw(NOT_FLOAT)],
            ["bench", "vitc_micro", "--batch-sizes", "x" + draw(TOKEN)],
        ]))
    if case == "choice":
        return draw(st.sampled_from([["study", "quick", "--executor", draw(NOT_CHOICE)],
                                     ["bench", "vitc_micro", "--device", draw(NOT_CHOICE)]]))
    if case == "report":
        return ["report", draw(st.one_of(WORD, st.sampled_from(BAD_PATHS)))]
    if case == "missing":
        return draw(st.sampled_from([[], ["search"], ["report"], ["validate"], ["bench"]]))
    return ["list", draw(WORD)]  # "extra": list takes no arguments


def _tree(root) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def cli_workdir(tmp_path_factory):
    """A working folder with the bad files in it; the fuzz runs there and checks that nothing changes in it."""
    root = tmp_path_factory.mktemp("cli")
    for name, data in BAD_FILES.items():
        (root / name).write_bytes(data)
    (root / "dir.yaml").mkdir()
    before = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(before)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_argv())
def test_bad_command_lines_end_in_one_clear_line(cli_workdir, argv) -> None:
    import contextlib
    import io

    from vitcompress.cli import main

    before = _tree(cli_workdir)
    out, err = io.StringIO(), io.StringIO()
    usage_error = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)  # any other exception escapes here: a traceback, which fails the test
        except SystemExit as exc:  # argparse's own errors: usage, then one "error:" line, exit 2
            code, usage_error = exc.code, True
    lines = err.getvalue().strip("\n").split("\n")
    assert code == 2, (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue() and out.getvalue() == ""
    if usage_error:
        assert lines[0].startswith("usage: vitcompress")
        assert lines[-1].startswith("vitcompress") and ": error: " in lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 12, (argv, lines)
    assert _tree(cli_workdir) == before  # nothing written, moved or touched


# ---- damaged checkpoint files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = create_model(ModelSpec("vitc_micro"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "m.safetensors"))
    torch.save(state, root / "m.pth")
    return root, {suffix: (root / f"m{suffix}").read_bytes() for suffix in (".safetensors", ".pth")}, model


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from([".safetensors", ".pth"]), cut=st.floats(0.0, 1.0, exclude_max=True),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=4))
def test_truncated_or_corrupted_checkpoints_load_or_fail_in_one_line(micro_checkpoints, suffix, cut, flips) -> None:
    """Cut a checkpoint short (always an error) or overwrite bytes (an error, or other weights)."""
    root, good, model = micro_checkpoints
    data = bytearray(good[suffix])
    for where, value in flips:
        data[int(where * len(data))] = value
    keep = int(cut * len(data)) if not flips else len(data)  # an empty file included
    path = root / f"damaged{suffix}"
    path.write_bytes(bytes(data[:keep]))
    try:
        load_weights(model, path)  # the same model each time: a load that succeeds only changes its weights
    except VitcompressError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert flips, "a truncated checkpoint loaded"


# ---- the hostile-file classes, each a seeded batch with its counts printed ------------------------------------
def _report(capsys: pytest.CaptureFixture[str], what: str, counts: dict[str, int]) -> None:
    with capsys.disabled():
        print(f"\nfuzz {what}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


def test_fuzz_bit_flips_in_artifact_files(artifact, capsys) -> None:
    """One to eight bit flips anywhere in model.safetensors or meta.json: every one is caught by the hashes;
    read without them, each loads (other weights) or fails in one line."""
    import random

    from vitcompress.artifact import CHECKSUMS_FILE, META_FILE, WEIGHTS_FILE, ArtifactChanged

    rng = random.Random(0)
    good = {name: (artifact / name).read_bytes() for name in (WEIGHTS_FILE, META_FILE, CHECKSUMS_FILE)}
    counts = {"cases": 0, "caught by the hashes": 0, "loaded unchecked": 0, "one-line errors unchecked": 0}
    for _ in range(150):
        name = rng.choice([WEIGHTS_FILE, META_FILE])
        data = bytearray(good[name])
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if bytes(data) == good[name]:
            continue
        (artifact / name).write_bytes(bytes(data))
        counts["cases"] += 1
        with pytest.raises(ArtifactChanged, match=f"{name} changed since it was written"):
            load_artifact(artifact)
        counts["caught by the hashes"] += 1
        try:
            load_artifact(artifact, verify=False)
            counts["loaded unchecked"] += 1
        except VitcompressError as exc:
            assert "\n" not in str(exc)
            counts["one-line errors unchecked"] += 1
        (artifact / name).write_bytes(good[name])
    _report(capsys, "bit flips in artifact files", counts)
    assert counts["caught by the hashes"] == counts["cases"] > 100


def _hostile_json(rng, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, -1, 0, 2**62, 1.5, float("nan")])
    if kind == 1:
        return rng.choice(["", "float32", "int8", "bogus", "a" * rng.randrange(1, 200)])
    if kind == 2:
        return [rng.randrange(-3, 10**12) for _ in range(rng.randrange(5))]
    if kind == 3:
        return ["w", rng.choice(["float32", "int8", "uint8", "bogus"]), [rng.randrange(-2, 10**9) for _ in range(3)]]
    if kind == 4:
        return [_hostile_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["format", "index", "layout", "x"]): _hostile_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_fuzz_hostile_index_metadata(artifact, capsys) -> None:
    """Random JSON (and random bytes) as a packed file's compressed index: each is one line, never a traceback."""
    import base64
    import random
    import zlib

    from safetensors.torch import load_file

    rng = random.Random(1)
    blobs = load_file(str(artifact / "model.safetensors"))
    counts = {"cases": 0, "one-line errors": 0}
    for i in range(150):
        doc = _hostile_json(rng)
        if i % 3 == 0:
            doc = {"format": "2", "layout": _hostile_json(rng) if i % 2 else {}, "index": _hostile_json(rng)}
        payload = (json.dumps(doc).encode() if i % 5 else bytes(rng.randrange(256) for _ in range(64)))
        packed = base64.b64encode(zlib.compress(payload)).decode() if i % 7 else "not base64 %%"
        save_file(blobs, str(artifact / "model.safetensors"), metadata={"vitcompress_index": packed})
        counts["cases"] += 1
        with pytest.raises(VitcompressError) as info:
            load_artifact(artifact, verify=False)
        assert "\n" not in str(info.value)
        counts["one-line errors"] += 1
    _report(capsys, "hostile index metadata", counts)
    assert counts["one-line errors"] == counts["cases"]


def _nested(rng, depth: int):
    """A label structure with shared references: small to pickle, huge to walk."""
    leaf: object = [rng.randrange(10) for _ in range(rng.randrange(1, 50))]
    for _ in range(depth):
        leaf = rng.choice([[leaf] * rng.randrange(2, 1000), [leaf, rng.randrange(10)], {"x": leaf}, (leaf,) * 3])
    return leaf


def test_fuzz_nested_structure_pickles(tmp_path, capsys) -> None:
    """CIFAR batches whose labels are nested, shared structures: refused in one line, before any walk."""
    import random

    from fixtures_data import write_cifar10

    from vitcompress.data import clear_cache, load_split

    rng = random.Random(2)
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    good = (folder / "data_batch_1").read_bytes()
    counts = {"cases": 0, "one-line errors": 0, "loaded (flat labels after all)": 0}
    for _ in range(60):
        with open(folder / "data_batch_1", "wb") as f:
            pickle.dump({b"data": np.zeros((6, 3072), np.uint8), b"labels": _nested(rng, rng.randrange(1, 5))}, f,
                        protocol=2)
        clear_cache()
        counts["cases"] += 1
        t = time.perf_counter()
        try:
            load_split("cifar10", "train", tmp_path)
            counts["loaded (flat labels after all)"] += 1
        except VitcompressError as exc:
            assert "\n" not in str(exc)
            counts["one-line errors"] += 1
        assert time.perf_counter() - t < 5
    (folder / "data_batch_1").write_bytes(good)
    _report(capsys, "nested-structure pickles", counts)
    assert counts["one-line errors"] >= 55


def test_fuzz_yaml_aliases(tmp_path, capsys) -> None:
    """Recipes with anchors and aliases anywhere: refused in one line, before anything expands."""
    import random

    from vitcompress.study import load_recipe

    rng = random.Random(3)
    counts = {"cases": 0, "refused": 0}
    for i in range(60):
        width, depth = rng.randrange(2, 12), rng.randrange(1, 10)
        lines = ["name: alias", f"a0: &a0 [{', '.join(['x'] * width)}]"]
        lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]" for k in range(1, depth)]
        where = rng.choice(["baseline: {model: vitc_micro, model_kwargs: {x: *A}}",
                            "baseline: {model: vitc_micro}\nexperiments: [{name: e, steps: *A}]",
                            "baseline: {model: vitc_micro}\ndescription: *A"])
        lines.append(where.replace("*A", f"*a{depth - 1}"))
        path = tmp_path / f"r{i}.yaml"
        path.write_text("\n".join(lines) + "\n")
        counts["cases"] += 1
        with pytest.raises(VitcompressError, match="may not use YAML aliases"):
            load_recipe(path)
        counts["refused"] += 1
    _report(capsys, "YAML aliases", counts)
    assert counts["refused"] == counts["cases"]


NUMERIC_PATHS = [("seed",), ("data", "calib_images"), ("baseline", "img_size"), ("baseline", "train", "epochs"),
                 ("baseline", "train", "lr"), ("baseline", "train", "batch_size"), ("baseline", "train", "warmup_epochs"),
                 ("measure", "batch_size"), ("measure", "eval_batch_size"), ("measure", "threads"),
                 ("measure", "repeats"), ("measure", "min_repeat_seconds"), ("measure", "latency_samples"),
                 ("measure", "interleave_group"), ("measure", "test_subset")]


def test_fuzz_out_of_range_numbers(capsys) -> None:
    """Huge, negative, infinite and NaN numbers in every numeric recipe field: parsed, or refused in one line,
    fast; whatever parses stays within what a study can run (finite, bounded)."""
    import math
    import random

    rng = random.Random(4)
    values = [2**64, 2**53 + 1, -(2**63), 10**18, -1, 0, float("inf"), float("-inf"), float("nan"), 1e308, -1e-300,
              10**6, 1024, 1.5]
    counts = {"cases": 0, "refused": 0, "parsed": 0}
    for _ in range(300):
        d = tiny_recipe_dict()
        path, value = rng.choice(NUMERIC_PATHS), rng.choice(values)
        node = d
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        counts["cases"] += 1
        t = time.perf_counter()
        try:
            recipe = parse_recipe(d)
            counts["parsed"] += 1
            for section in (recipe.measure, recipe.baseline.train, recipe.data):
                for v in vars(section).values():
                    if isinstance(v, float):
                        assert math.isfinite(v)
                    if isinstance(v, int) and not isinstance(v, bool):
                        assert abs(v) <= 2**53
        except VitcompressError as exc:
            assert "\n" not in str(exc)
            counts["refused"] += 1
        assert time.perf_counter() - t < 10
    _report(capsys, "out-of-range numbers", counts)
    assert counts["refused"] > counts["cases"] // 2
