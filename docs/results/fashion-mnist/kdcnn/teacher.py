"""Train a timm ResNet-18 teacher on Fashion-MNIST (session-5 experiment: does a CNN teacher help DeiT tiny?).

    python teacher.py resnet18 6          # 91.82%, runs/kdcnn/resnet18.safetensors
    python teacher.py resnet18 20 aug     # random crop + flip: runs/kdcnn/resnet18-aug20.safetensors
"""
import sys, time
import timm, torch
from safetensors.torch import save_file
from vitcompress.data import load_split
from vitcompress.measure import evaluate_accuracy
from vitcompress.train import TrainConfig, fit

name, epochs = sys.argv[1], int(sys.argv[2])
augment = sys.argv[3:] == ["aug"]
out = f"runs/kdcnn/{name}" + (f"-aug{epochs}" if augment else "")
torch.manual_seed(0)
train = load_split("fashion-mnist", "train")
test = load_split("fashion-mnist", "test")
model = timm.create_model(name, num_classes=10, in_chans=1)
print(name, sum(p.numel() for p in model.parameters()))
t0 = time.time()
cfg = TrainConfig(epochs=epochs, batch_size=128, lr=2e-3, warmup_epochs=0.3, mixed_precision="no", augment=augment)
model = fit(model, train, cfg, work_dir=f"{out}-work", img_size=28, in_chans=1, progress=False).model
print("train s", round(time.time() - t0))
print("test", evaluate_accuracy(model.eval(), test, img_size=28, in_chans=1))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.safetensors")
