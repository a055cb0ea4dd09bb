"""A user's model: transformers ViT/DeiT checkpoints converted to timm, timm names with tags and local weights,
students from local files, inputs prepared as the model says, and early refusal of what cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import tiny_recipe_dict
from fixtures_data import write_image_folder
from safetensors.torch import save_file

from vitcompress.artifact import read_meta
from vitcompress.errors import VitcompressError
from vitcompress.models import load_model, model_kind
from vitcompress.study import parse_recipe, run_study

transformers = pytest.importorskip("transformers")


def _hf_model(kind: str, *, labels: list[str] | None = None, seed: int = 0, depth: int = 2):
    from transformers import (
        DeiTConfig,
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
    )

    cls, cfg_cls = {"vit": (ViTForImageClassification, ViTConfig),
                    "deit": (DeiTForImageClassification, DeiTConfig),
                    "deit_teacher": (DeiTForImageClassificationWithTeacher, DeiTConfig)}[kind]
    labels = labels or ["a", "b", "c"]
    cfg = cfg_cls(image_size=24, patch_size=4, hidden_size=48, num_hidden_layers=depth, num_attention_heads=3,
                  intermediate_size=96, num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # away from the initialisation's symmetries, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _save(model, folder: Path, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)) -> Path:
    from transformers import ViTImageProcessor

    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 24, "width": 24}, resample=3, image_mean=list(mean),
                      image_std=list(std)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["vit", "deit", "deit_teacher"])
def test_transformers_checkpoints_convert_to_timm_with_the_same_logits(kind: str, tmp_path: Path) -> None:
    hf = _hf_model(kind)
    folder = _save(hf, tmp_path / "m")
    assert model_kind(str(folder)) == "hf"
    loaded = load_model(str(folder), num_classes=3, dataset_classes=("a", "b", "c"))
    x = torch.randn(4, 3, 24, 24)
    with torch.inference_mode():
        ref, got = hf(pixel_values=x).logits, loaded.model.eval()(x)
    assert (ref - got).abs().max() <= 1e-4
    assert loaded.classes == ("a", "b", "c") and not loaded.head_reset
    assert loaded.preprocess.source == "hf" and loaded.preprocess.mean == (0.5, 0.4, 0.3)
    assert loaded.spec.name == ("vitc_deit" if kind == "deit_teacher" else "vitc_vit")
    assert loaded.spec.kwargs["norm_eps"] == 1e-12
    # The spec alone rebuilds the architecture (what an artifact holds), and the weights fit it.
    from vitcompress.models import create_model

    rebuilt = create_model(loaded.spec)
    rebuilt.load_state_dict(loaded.model.state_dict())
    # transformers' in-memory names (layers.N.attention.q_proj, ...) convert the same as the files' names.
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(folder / "model.safetensors"))
    again = load_model(str(folder), num_classes=3)
    with torch.inference_mode():
        assert (again.model.eval()(x) - ref).abs().max() <= 1e-4


def test_a_head_in_another_class_order_is_reordered_and_a_foreign_one_reset(tmp_path: Path) -> None:
    hf = _hf_model("vit", labels=["dog", "cat", "bird"])
    folder = _save(hf, tmp_path / "m")
    x = torch.randn(3, 3, 24, 24)
    loaded = load_model(str(folder), num_classes=3, dataset_classes=("bird", "cat", "dog"))
    with torch.inference_mode():
        ref, got = hf(pixel_values=x).logits, loaded.model.eval()(x)
    assert not loaded.head_reset and any("reordered" in n for n in loaded.notes)
    torch.testing.assert_close(got, ref[:, [2, 1, 0]], atol=1e-4, rtol=0)
    other = load_model(str(folder), num_classes=3, dataset_classes=("ant", "bee", "cow"))
    assert other.head_reset and any("re-initialised" in n for n in other.notes)
    four = load_model(str(folder), num_classes=4)
    assert four.head_reset and four.model.head.out_features == 4


def test_unsupported_transformers_models_are_refused_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "swin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "swin",
                                                    "architectures": ["SwinForImageClassification"]}))
    with pytest.raises(VitcompressError, match="SwinForImageClassification.*not supported"):
        load_model(str(folder), num_classes=3)
    with pytest.raises(VitcompressError, match="cannot download 'nobody/no-such-model'"):
        load_model("nobody/no-such-model", num_classes=3)


def test_timm_names_with_tags_and_local_weights_at_another_size(tmp_path: Path) -> None:
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert model_kind(name) == "timm"
    src = timm.create_model("vit_tiny_patch16_224", depth=2).eval()  # a 224 px, 1000-class checkpoint
    ckpt = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(ckpt))
    loaded = load_model(name, num_classes=10, img_size=64, checkpoint=str(ckpt), kwargs={"depth": 2})
    m = loaded.model
    assert m.pos_embed.shape == (1, 1 + 16, 192)  # resampled from 14x14 to 4x4 patches
    assert loaded.head_reset and m.head.out_features == 10
    torch.testing.assert_close(m.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    # The model's own input recipe, at its input size: augreg's mean/std 0.5, bicubic, crop 0.9.
    p = loaded.preprocess
    assert (p.source, p.mean, p.interpolation, p.input_size, p.resize) == ("timm", (0.5,) * 3, "bicubic", 64, 71)
    # A checkpoint fine-tuned on these classes keeps its head.
    tuned = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=10, img_size=64)
    save_file(tuned.state_dict(), str(tmp_path / "tuned.safetensors"))
    kept = load_model(name, num_classes=10, img_size=64, checkpoint=str(tmp_path / "tuned.safetensors"),
                      kwargs={"depth": 2})
    assert not kept.head_reset
    torch.testing.assert_close(kept.model.head.weight, tuned.head.weight)


def _recipe(tmp_path: Path, model: str, experiments: list, **baseline) -> dict:
    d = tiny_recipe_dict()
    d["baseline"] = {"model": model, **baseline}
    d["experiments"] = experiments
    return d


@pytest.mark.parametrize("model,method,refused", [
    ("resnet18", "prune.structured", "ResNet is not a timm VisionTransformer"),
    ("resnet18", "ptq.dynamic", None),
    ("swin_tiny_patch4_window7_224", "tokens.merge", "SwinTransformer is not a timm VisionTransformer"),
    ("swin_tiny_patch4_window7_224", "ptq.static", None),
    ("beit_base_patch16_224", "ptq.static", "Beit reads its Linear layers' weights directly"),
    ("eva02_tiny_patch14_224", "lowrank.svd", "Eva reads its Linear layers' weights directly"),
    ("eva02_tiny_patch14_224", "lowrank.nystrom", "Eva is not a timm VisionTransformer"),
    ("vit_tiny_patch16_224", "prune.gates", None),
])
def test_validate_refuses_what_cannot_run_on_the_architecture(tmp_path, model, method, refused) -> None:
    d = _recipe(tmp_path, model, [{"name": "x", "steps": [{method: {}}]}])
    d["data"] = {"name": "cifar10"}
    if refused is None:
        parse_recipe(d)
    else:
        with pytest.raises(VitcompressError, match=f"{method} cannot run on {model}: {refused}"):
            parse_recipe(d)


def test_validate_catches_missing_files_and_untrained_students(tmp_path) -> None:
    d = _recipe(tmp_path, "vitc_micro", [{"name": "x", "steps": [{"distill": {
        "student": "deit_tiny_distilled_patch16_224", "checkpoint": str(tmp_path / "none.pth"), "epochs": 1}}]}])
    with pytest.raises(VitcompressError, match=r"distill.checkpoint: .*none.pth does not exist"):
        parse_recipe(d)
    d = _recipe(tmp_path, "vitc_micro", [{"name": "x", "steps": [{"distill": {"student": "tiny"}}]}],
                train={"epochs": 0})
    with pytest.raises(VitcompressError, match="set distill.epochs"):
        parse_recipe(d)
    d = _recipe(tmp_path, "vitc_micro", [{"name": "x", "steps": [{"distill": {"student": "tiny", "checkpoint": "a"}}]}])
    with pytest.raises(VitcompressError, match="student 'tiny' has none to load"):
        parse_recipe(d)


def _hf_top1(hf, files: list[tuple[Path, int]], proc) -> float:
    """What transformers itself measures: each file through Pillow (RGB), the image processor, the model."""
    from PIL import Image

    with torch.inference_mode():
        x = proc(images=[Image.open(p).convert("RGB") for p, _ in files], return_tensors="pt")["pixel_values"]
        pred = hf(pixel_values=x).logits.argmax(-1)
    return 100.0 * sum(int(p == y) for p, (_, y) in zip(pred.tolist(), files)) / len(files)


def test_a_users_hf_model_on_their_image_folder_end_to_end(tmp_path: Path, one_thread) -> None:
    """The issue's path in miniature: a transformers ViT evaluated as it is (epochs 0) on a folder of images;
    its top-1 is what transformers measures; methods, a student from a local file, and the export follow."""
    from transformers import ViTImageProcessor

    root = write_image_folder(tmp_path / "imgs", per_class={"bird": 10, "Cat": 10, "dog": 10}, val_per_class=8)
    hf = _hf_model("vit", labels=["dog", "bird", "Cat"])  # another class order than the folder's
    model_dir = _save(hf, tmp_path / "hf")
    student_dir = _save(_hf_model("vit", labels=["Cat", "bird", "dog"], seed=1, depth=1), tmp_path / "student")
    d = tiny_recipe_dict()
    d["data"] = {"name": "imagefolder", "root": str(root), "calib_images": 16}
    d["baseline"] = {"name": "HF ViT", "model": str(model_dir),
                     "train": {"epochs": 0, "batch_size": 8, "mixed_precision": "no"}}
    d["measure"].pop("test_subset")
    d["experiments"] = [
        {"name": "Static int8", "steps": [{"ptq.static": {"calibrator": "minmax"}}]},
        {"name": "Pruned", "steps": [{"prune.structured": {"ratio": 0.3, "finetune_epochs": 1}}]},
        {"name": "Merged", "steps": [{"tokens.merge": {"r": 4}}]},
        {"name": "Student", "steps": [{"distill": {"student": str(student_dir), "epochs": 1, "loss": "soft"}}]},
    ]
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(d))
    from vitcompress.study import load_recipe

    logs: list[str] = []
    res = run_study(load_recipe(recipe_path), tmp_path / "run", progress=False, log=logs.append)
    rows = {r["name"]: r for r in res.rows}
    assert all(r["status"] == "ok" for r in rows.values()), {n: r.get("error") for n, r in rows.items()}
    files = [(p, ["Cat", "bird", "dog"].index(p.parent.name)) for p in sorted((root / "val").rglob("*"))
             if p.is_file() and p.suffix.lower() in (".png", ".gif", ".jpg", ".jpeg")]
    proc = ViTImageProcessor.from_pretrained(model_dir)
    # transformers' labels are in the model's order (dog, bird, Cat): map them to the folder's.
    order = ["dog", "bird", "Cat"]
    hf_files = [(p, order.index(["Cat", "bird", "dog"][y])) for p, y in files]
    assert rows["HF ViT"]["n_test"] == len(files) == 24
    assert rows["HF ViT"]["top1"] == pytest.approx(_hf_top1(hf, hf_files, proc), abs=1e-9)
    assert any("reordered" in m for m in logs) and any("from hf" in m for m in logs)
    art = tmp_path / "run" / Path(rows["Static int8"]["artifact"]).parent
    meta = read_meta(art)
    assert meta["classes"] == ["Cat", "bird", "dog"] and meta["preprocess"]["source"] == "hf"
    assert meta["preprocess"]["mean"] == [0.5, 0.4, 0.3]
    # The export carries the input recipe and the labels beside the model files.
    from vitcompress.cli import main

    assert main(["export", str(art), "--out", str(tmp_path / "deploy"), "--formats", "onnx", "--data", str(root),
                 "--images", "8", "--threads", "1"]) == 0
    assert json.loads((tmp_path / "deploy" / "preprocess.json").read_text())["mean"] == [0.5, 0.4, 0.3]
    assert json.loads((tmp_path / "deploy" / "labels.json").read_text()) == ["Cat", "bird", "dog"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Inputs (preprocessing)" in report and "imagefolder" in report


def test_offline_deit_student_from_a_local_checkpoint(tmp_path: Path, one_thread) -> None:
    """distill's named student from a local file (the offline twin of pretrained: true): a 224 px, 1000-class
    DeiT-Ti checkpoint becomes a 32 px, 10-class student with its blocks' weights, then trains."""
    import dataclasses

    from vitcompress.data import ImageTensorDataset, dataset_info
    from vitcompress.methods import get_method, parse_config
    from vitcompress.models import ModelSpec, create_model
    from vitcompress.study.context import StepContext
    from vitcompress.train import TrainConfig

    src = timm.create_model("deit_tiny_distilled_patch16_224")
    ckpt = tmp_path / "deit.pth"
    torch.save(src.state_dict(), ckpt)
    g = torch.Generator().manual_seed(0)
    ds = ImageTensorDataset(torch.randint(0, 255, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                            torch.randint(0, 10, (64,), generator=g), dataclasses.replace(dataset_info("cifar10")),
                            "train", "x")
    ctx = StepContext(ds, 32, 3, 10, 0, tmp_path / "w", TrainConfig(epochs=1, batch_size=32, mixed_precision="no"),
                      progress=False)
    teacher = create_model(ModelSpec("vitc_micro", 10, 32, 3)).eval()
    cfg = parse_config("distill", {"student": "deit_tiny_distilled_patch16_224", "checkpoint": str(ckpt),
                                   "epochs": 0}, "test")
    out = get_method("distill").apply(teacher, cfg, dataclasses.replace(ctx, teacher=teacher))
    student = out.model
    assert student.pos_embed.shape == (1, 2 + 4, 192)  # resampled to 2x2 patches, class and distillation tokens
    assert student.head.out_features == student.head_dist.out_features == 10
    torch.testing.assert_close(student.blocks[7].attn.qkv.weight, src.blocks[7].attn.qkv.weight)
    assert out.meta["student"]["name"] == "deit_tiny_distilled_patch16_224"
    assert out.meta["student"]["checkpoint"] is None  # the artifact's own tensors fill the rebuilt student
    # A file of another layout: one line naming the file.
    small = timm.create_model("deit_tiny_distilled_patch16_224", depth=2)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    cfg = parse_config("distill", {"student": "deit_tiny_distilled_patch16_224",
                                   "checkpoint": str(tmp_path / "small.pth"), "epochs": 0}, "test")
    with pytest.raises(VitcompressError, match=r"small.pth does not fit model 'deit_tiny_distilled_patch16_224'"):
        get_method("distill").apply(teacher, cfg, dataclasses.replace(ctx, teacher=teacher))


def test_an_untrained_head_is_not_evaluated_as_the_baseline(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", per_class={"bird": 3, "Cat": 3, "dog": 3})
    model_dir = _save(_hf_model("vit", labels=["ant", "bee", "cow", "doe"]), tmp_path / "hf")
    d = tiny_recipe_dict()
    d["data"] = {"name": "imagefolder", "root": str(root)}
    d["baseline"] = {"model": str(model_dir), "train": {"epochs": 0}}
    d["experiments"] = []
    with pytest.raises(VitcompressError, match="epochs is 0 .* head was re-initialised"):
        run_study(parse_recipe(d), tmp_path / "run", progress=False, log=lambda m: None)


def test_bench_and_list_take_users_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitcompress.cli import main

    folder = _save(_hf_model("deit_teacher"), tmp_path / "m")
    out = tmp_path / "b.json"
    assert main(["bench", str(folder), "--runtimes", "torch-eager", "--batch-sizes", "2", "--repeats", "1",
                 "--warmup", "0", "--min-repeat-seconds", "0", "--latency-samples", "2", "--no-progress",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["runtimes"][0]["parity"]["top1_agreement"] == 1.0
    capsys.readouterr()
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    from vitcompress.methods import list_methods

    assert listing.count("runs on:") == len(list_methods())
    assert "transformers ViT/DeiT classifier folder" in listing
