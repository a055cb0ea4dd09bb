"""Image folders in memory and streamed: decode throughput and peak memory, at two folder sizes.

Writes a folder of small PNG files (Fashion-MNIST images, repeated and shifted so no two files are
equal) in the torchvision layout, then, for each folder size and each path, in a fresh process:

* ``memory``: the split decoded once into RAM (``data.memory_budget_mb`` large enough), as a small
  dataset is: images/s of that pass, and the process's peak RSS (it holds every decoded image);
* ``stream``: one pass over the split through ``make_loader`` with the budget at 0, as a dataset too
  large for memory is read every epoch: images/s, the main process's peak RSS, and the largest worker
  process's peak RSS (``RUSAGE_CHILDREN``; a forked worker counts the pages it shares with the main
  process too); the one-time check of every file's header is timed apart.

Both also report the folder scan (listing the files into the index).

Streamed memory should not grow with the folder (only the file index does: one bytes array of relative
paths); in-memory memory grows by images x channels x size x size bytes. Each process's RSS just before
decoding (torch and the index loaded) is reported too, and the growth from it to the peak.

    python benchmarks/data_stream.py --sizes 100000,200000 --folder runs/stream-bench --json docs/results/data_stream/data_stream.json

Run it on a quiet machine: the load average before and after is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZE = 32  # decoded to 3 x 32 x 32, a small ViT's input


def write_folder(root: Path, n: int) -> None:
    """``root/train/<class>/`` (n images) and ``root/val/<class>/`` (n // 10), PNG files of 28 px."""
    from PIL import Image

    from vitcompress.data import load_split

    if (root / "done").is_file() and int((root / "done").read_text()) == n:
        return
    src = load_split("fashion-mnist", "train")
    images, labels = src.images[:, 0].numpy(), src.labels.numpy()
    for split, count in (("train", n), ("val", n // 10)):
        for c in range(10):
            (root / split / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            j = i % len(labels)
            img = np.roll(images[j], shift=i // len(labels), axis=1)  # a repeat is shifted: every file differs
            Image.fromarray(img).save(root / split / f"class_{labels[j]}" / f"{split}_{i:07d}.png")
    (root / "done").write_text(str(n))


def measure(root: str, path: str, workers: int) -> dict:
    """One path on one folder, in this (fresh) process."""
    import torch

    from vitcompress.data import (
        DataConfig,
        FileImages,
        ImageTensorDataset,
        Preprocess,
        make_loader,
        open_source,
    )

    torch.set_num_threads(1)
    pre = Preprocess(SIZE, 3, (0.5,) * 3, (0.25,) * 3, "bilinear", None, "shortest", "dataset")
    t0 = time.perf_counter()
    source = open_source(DataConfig(name="imagefolder", root=root, memory_budget_mb=1e6 if path == "memory" else 0,
                                    workers=workers))
    scan = time.perf_counter() - t0
    before = _status_mb("VmRSS")  # torch and the file index loaded, no image decoded yet
    t0 = time.perf_counter()
    ds = source.split("train", pre)  # memory: decodes every image; stream: checks every file's header
    prepare = time.perf_counter() - t0
    if path == "memory":
        assert isinstance(ds, ImageTensorDataset)
        n, seconds = len(ds), prepare
    else:
        assert isinstance(ds, FileImages)
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in make_loader(ds, 256, train=False))
        seconds = time.perf_counter() - t0
    own = _status_mb("VmHWM")  # this process's peak (ru_maxrss would carry the parent's from before exec)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"path": path, "images": n, "scan_s": scan, "header_check_s": prepare if path == "stream" else None,
            "decode_s": seconds, "img_s": n / seconds,
            "rss_before_mb": before, "peak_rss_mb": own, "growth_mb": own - before, "worker_peak_rss_mb": kids if path == "stream" else None,
            "workers": workers, "held_mb": n * 3 * SIZE * SIZE / 2**20 if path == "memory" else 0.0}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,200000", help="training images per folder, comma-separated")
    p.add_argument("--folder", default="runs/stream-bench", help="where the folders are written (kept for reruns)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, metavar=("ROOT", "PATH", "WORKERS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1], int(a.child[2]))))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    from vitcompress.measure import environment

    out = {"env": environment(a.workers), "load_before": os.getloadavg(), "decoded_to": f"3x{SIZE}x{SIZE} uint8",
           "runs": []}
    for n in sizes:
        root = Path(a.folder) / f"n{n}"
        t0 = time.perf_counter()
        write_folder(root, n)
        print(f"folder {root}: {n} training images ({time.perf_counter() - t0:.0f} s to write)", flush=True)
        for path in ("memory", "stream"):
            res = subprocess.run([sys.executable, __file__, "--child", str(root), path, str(a.workers)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1]) | {"folder_images": n}
            out["runs"].append(row)
            print(f"  {path:<6} {row['img_s']:8.0f} img/s  peak RSS {row['peak_rss_mb']:7.0f} MB "
                  f"({row['growth_mb']:+.0f} MB over the {row['rss_before_mb']:.0f} MB before decoding)"
                  + (f" (+ {row['worker_peak_rss_mb']:.0f} MB per worker)" if row["worker_peak_rss_mb"] else "")
                  + f"  scan {row['scan_s']:.1f} s"
                  + (f", header check {row['header_check_s']:.1f} s" if row["header_check_s"] else ""), flush=True)
    out["load_after"] = os.getloadavg()
    out["machine"] = platform.machine()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"json: {a.json}")


if __name__ == "__main__":
    main()
