"""Build what the imagefolder-hf study starts from, as a user would arrive with it: a folder of real images
and a Hugging Face ViT fine-tuned on it.

1. ``--data DIR``: Fashion-MNIST (the Debian package's idx files) written out as image files in the
   torchvision layout, ``DIR/train/<class>/`` (60,000) and ``DIR/val/<class>/`` (10,000), in mixed sizes
   (each side 28 to 56 px, not square), modes and formats: greyscale PNG, RGB PNG, RGBA PNG, palette GIF,
   JPEG saved as .jpg, .JPG and .jpeg; plus a ``.DS_Store`` and a ``Thumbs.db``, as real folders have.
2. ``--model DIR``: a transformers ``ViTForImageClassification`` (32 px, 4 px patches, width 96, 4 layers)
   trained 8 epochs on ``DIR/train`` with transformers' own ``ViTImageProcessor`` (bicubic resize to 32x32, the
   data's mean and std), saved with ``save_pretrained`` (config.json with id2label, model.safetensors,
   preprocessor_config.json). Then its top-1 on ``DIR/val`` as transformers measures it: each file opened
   with Pillow, converted to RGB, passed through the saved processor (transformers' default backend,
   torchvision, and its Pillow backend) and the model; written to ``hf_eval.json``.
3. ``--student DIR``: a smaller ViT of the same kind (2 layers, width 64), trained one epoch on labels:
   the "small model a user already has" that the distill row starts from.
4. ``--hf-dataset DIR``: the same folder as a Hugging Face dataset (``load_dataset("imagefolder")``, then
   ``save_to_disk``), for the ``name: hf`` run.

    python docs/results/imagefolder-hf/build.py --data runs/fmnist-folder --model runs/fmnist-hf-vit \\
        --student runs/fmnist-hf-student --hf-dataset runs/fmnist-hf-dataset

Nothing is downloaded. Needs transformers and datasets (``pip install -e '.[hf]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's own statistics: the user normalised with their data's


def write_folder(root: Path) -> None:
    from vitcompress.data import load_split

    rng = np.random.default_rng(0)
    for split, folder in (("train", "train"), ("test", "val")):
        ds = load_split("fashion-mnist", split)
        for c in CLASSES:
            (root / folder / c).mkdir(parents=True, exist_ok=True)
        images, labels = ds.images[:, 0].numpy(), ds.labels.numpy()
        for i, (img, y) in enumerate(zip(images, labels)):
            w, h = (int(v) for v in rng.integers(28, 57, size=2))
            pil = Image.fromarray(img, mode="L").resize((w, h), Image.Resampling.BICUBIC)
            kind = i % 8
            base = root / folder / CLASSES[y] / f"{split}_{i:05d}"
            if kind in (0, 1):
                pil.save(base.with_suffix(".png"))
            elif kind == 2:
                pil.convert("RGB").save(base.with_suffix(".png"))
            elif kind == 3:
                pil.convert("RGBA").save(base.with_suffix(".PNG"))
            elif kind == 4:
                pil.convert("P").save(base.with_suffix(".gif"))
            else:
                pil.convert("RGB").save(base.with_suffix((".jpg", ".JPG", ".jpeg")[kind - 5]), quality=95)
        print(f"{folder}: {len(labels)} images", flush=True)
    (root / "train" / "Bag" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "val" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")


def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 32, "width": 32}, resample=Image.Resampling.BICUBIC,
                             image_mean=[MEAN] * 3, image_std=[STD] * 3)


def files(root: Path, folder: str) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    exts = {".png", ".gif", ".jpg", ".jpeg"}
    for y, c in enumerate(CLASSES):
        for p in sorted((root / folder / c).iterdir()):
            if p.suffix.lower() in exts:
                paths.append(p)
                labels.append(y)
    return paths, labels


def pixels(paths: list[Path], proc) -> torch.Tensor:
    """transformers' preprocessing of every file: Pillow, RGB, the image processor."""
    out = []
    for i in range(0, len(paths), 512):
        imgs = [Image.open(p).convert("RGB") for p in paths[i:i + 512]]
        out.append(proc(images=imgs, return_tensors="pt")["pixel_values"].to(torch.float16))
    return torch.cat(out)


def train(model, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, augment: bool = False) -> None:
    """AdamW, warm-up + cosine, label smoothing; ``augment``: random crop (4 px, padded with the normalised
    black) + flip (off by default: at this budget a model this small underfits, and augmentation only slows
    it down, as the quick recipe measured)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(x) // 128)
    black = (0 - MEAN) / STD
    step = 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        t0, total = time.time(), 0.0
        for b in range(len(x) // 128):
            idx = perm[b * 128:(b + 1) * 128]
            xb = x[idx].float()
            if augment:
                xb = F.pad(xb, (4, 4, 4, 4), value=black)
                dy, dx = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
                xb = xb[:, :, dy:dy + 32, dx:dx + 32]
                flip = torch.rand(len(xb), generator=g) < 0.5
                xb[flip] = xb[flip].flip(-1)
            lr_now = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr_now
            loss = F.cross_entropy(model(pixel_values=xb).logits, y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / (len(x) // 128):.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()


@torch.inference_mode()
def top1(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(pixel_values=x[i:i + 256].float()).logits.argmax(-1) == y[i:i + 256]).sum())
               for i in range(0, len(x), 256))
    return 100.0 * hits / len(y)


def build_model(out: Path, data: Path, *, width: int, depth: int, heads: int, epochs: int, seed: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    proc = processor()
    train_paths, train_labels = files(data, "train")
    val_paths, val_labels = files(data, "val")
    x, y = pixels(train_paths, proc), torch.tensor(train_labels)
    cfg = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=width, num_hidden_layers=depth,
                    num_attention_heads=heads, intermediate_size=4 * width, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=len(CLASSES),
                    id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    model = ViTForImageClassification(cfg)
    train(model, x, y, epochs, 2e-3, seed)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    evaluate(out, data)


def evaluate(out: Path, data: Path) -> None:
    """What transformers itself measures on the val files: the saved model and processor read back, each
    file opened with Pillow and converted to RGB, with both of transformers' image-processor backends."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(out).eval()
    val_paths, val_labels = files(data, "val")
    result: dict = {"n_val": len(val_labels), "params": sum(p.numel() for p in model.parameters())}
    for backend in ("default", "pil"):
        proc = AutoImageProcessor.from_pretrained(out, **({} if backend == "default" else {"backend": "pil"}))
        result[f"top1_{backend}"] = top1(model, pixels(val_paths, proc), torch.tensor(val_labels))
        result[f"processor_{backend}"] = f"{type(proc).__name__} ({type(proc).__mro__[1].__name__})"
    (out / "hf_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{out}: {json.dumps(result)}", flush=True)


def build_hf_dataset(data: Path, out: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset("imagefolder", data_dir=str(data))
    ds.save_to_disk(str(out))
    print(f"{out}: {ds}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path)
    p.add_argument("--student", type=Path)
    p.add_argument("--hf-dataset", type=Path)
    p.add_argument("--epochs", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    if not (a.data / "train").is_dir():
        write_folder(a.data)
    for folder, layout in ((a.model, dict(width=96, depth=4, heads=3, epochs=a.epochs, seed=0)),
                           (a.student, dict(width=64, depth=2, heads=2, epochs=1, seed=1))):
        if folder and not (folder / "model.safetensors").is_file():
            build_model(folder, a.data, **layout)
        elif folder and not (folder / "hf_eval.json").is_file():
            evaluate(folder, a.data)
    if a.hf_dataset and not a.hf_dataset.is_dir():
        build_hf_dataset(a.data, a.hf_dataset)


if __name__ == "__main__":
    main()
