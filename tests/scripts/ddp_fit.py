"""Train a micro ViT for two epochs; run alone or under `accelerate launch` by tests/test_distributed.py."""

import json
import os
import sys

import torch

from vitcompress import dist
from vitcompress.data import ImageTensorDataset, dataset_info
from vitcompress.models import ModelSpec, create_model
from vitcompress.train import TrainConfig, fit

out, bs = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(1)
labels = torch.randint(0, 10, (256,), generator=g)
images = torch.randint(0, 255, (256, 1, 28, 28), generator=g, dtype=torch.uint8)
ds = ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "train", "synthetic")
torch.manual_seed(0)
m = create_model(ModelSpec("vitc_micro"))
res = fit(m, ds, TrainConfig(epochs=2, batch_size=bs, mixed_precision="no"), work_dir=out, img_size=28, in_chans=1, progress=False)
if int(os.environ.get("RANK", 0)) == 0:
    with open(os.path.join(out, "hist.json"), "w") as f:
        json.dump([h["loss"] for h in res.history], f)
    with open(os.path.join(out, "world.json"), "w") as f:
        json.dump(torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1, f)
dist.shutdown()
