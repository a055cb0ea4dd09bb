from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

# Keep test timings and results independent of how many cores the runner has.
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_recipe_dict(**over: Any) -> dict[str, Any]:
    """A recipe that trains a micro ViT on a slice of real Fashion-MNIST in seconds."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "fashion-mnist", "calib_images": 64},
        "baseline": {
            "model": "vitc_micro",
            "train": {"epochs": 2, "batch_size": 64, "lr": 3.0e-3, "train_subset": 512, "mixed_precision": "no"},
        },
        "measure": {"batch_size": 8, "repeats": 2, "warmup": 1, "min_repeat_seconds": 0.01,
                    "latency_samples": 5, "test_subset": 256},
        "experiments": [{"name": "Dynamic Quantization", "steps": [{"ptq.dynamic": {}}]}],
    }
    for key, value in over.items():
        recipe[key] = value
    return recipe


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronization (badly so on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def needs_fmnist() -> None:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def synthetic_train_set(n: int = 128):
    """Learnable synthetic 28 px images: the label decides which quadrant is bright and how bright."""
    from vitcompress.data import ImageTensorDataset, dataset_info

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        r, c = divmod(y % 4, 2)
        images[i, 0, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] += 120 + 10 * (y // 4)
    return ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "train", "synthetic")


def trained_like_batchnorms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every BatchNorm2d statistics and affine values of a trained model, not a fresh one's identity;
    returns the model in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()
