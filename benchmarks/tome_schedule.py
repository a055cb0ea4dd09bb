"""Token merging schedules on a trained ViT: test top-1 and speed-up against the unmerged model.

ToMe merges r tokens in every block; each merge is a handful of small operators (key
similarity, max, sort, gathers, a one-hot matmul). On a short sequence (the fashion-mnist
ViT has 50 tokens) their overhead can eat what the shorter sequence saves, so this script
compares schedules at equal or similar token counts: ``r=8`` (8 in each block) against
``16`` (16 once, in the first block) and so on. Nothing is trained.

    python benchmarks/tome_schedule.py runs/fm/artifacts/<baseline key> \\
        --schedules r=8 r=12 16 20 16,8 --runtime openvino --out runs/bench/tome_schedule.json

Accuracy is eager PyTorch on the whole Fashion-MNIST test split; speed is the runtime's, every
model timed in shuffled rounds with the unmerged one (the study's timing code) and reported as
the median of the round-by-round ratios with their quartiles.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from vitcompress.data import load_split
from vitcompress.measure import Threads, available_cores, environment, evaluate_accuracy
from vitcompress.measure.bench import load_target, paired_ratios, time_interleaved
from vitcompress.measure.runtimes import as_module, deploy
from vitcompress.methods.prune.tome import TokenMergeConfig, apply_merging


def parse_schedule(text: str) -> TokenMergeConfig:
    """``r=8`` merges 8 tokens in every block; ``16,8`` merges 16 in the first block and 8 in the second;
    ``entry=20`` merges 20 before the first block; a ``:flat`` suffix turns proportional attention off (``20:flat``)."""
    text, _, flag = text.partition(":")
    if flag not in ("", "flat"):
        raise SystemExit(f"schedule suffix {flag!r}: the only one is ':flat' (no proportional attention)")
    prop = flag != "flat"
    if text.startswith("entry="):  # merged before the first block
        return TokenMergeConfig(entry=int(text[6:]), prop_attn=prop)
    if text.startswith("r="):
        return TokenMergeConfig(r=int(text[2:]), prop_attn=prop)
    return TokenMergeConfig(schedule=tuple(int(v) for v in text.split(",")), prop_attn=prop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", type=Path, help="a saved (unmerged) model's artifact folder")
    ap.add_argument("--schedules", nargs="+", default=["r=8", "r=12", "16", "20"])
    ap.add_argument("--runtime", default="openvino", help="torch-eager, onnxruntime or openvino")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    args = ap.parse_args(argv)

    target = load_target(str(args.artifact))  # the model and its input shape, from the artifact's meta.json
    base, img_size, in_chans = target.model.eval(), target.img_size, target.in_chans
    models: dict[str, Any] = {"unmerged": base}
    schedules: dict[str, list[int]] = {}
    entries: dict[str, int] = {}  # merged before the first block
    for text in args.schedules:
        models[text], schedules[text], _ = apply_merging(copy.deepcopy(base), parse_schedule(text))
        entries[text] = models[text].blocks.entry
        models[text].eval()

    test = load_split(args.data, "test", args.data_root, False)
    top1 = {k: evaluate_accuracy(m, test, img_size=img_size, in_chans=in_chans)["top1"] for k, m in models.items()}

    threads = args.threads or available_cores()
    example = torch.randn(args.batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    work = args.out.parent / "tome_deploy" if args.out else Path("runs/bench/tome_deploy")
    deps = {k: as_module(deploy(args.runtime, m, example, threads, work / k.replace(",", "_").replace("=", "").replace(":", "_")))
            for k, m in models.items()}
    calls = {k: (lambda fn=fn: fn(example)) for k, fn in deps.items()}
    with torch.inference_mode(), Threads(threads):
        seconds = time_interleaved(calls, warmup=3, repeats=args.repeats, min_repeat_seconds=0.3)
    speed = {k: paired_ratios(seconds["unmerged"], seconds[k]) for k in schedules}

    print(f"{args.artifact} on {args.runtime}, batch {args.batch}, {threads} threads; unmerged: "
          f"{top1['unmerged']:.2f}% top-1, {args.batch / statistics.median(seconds['unmerged']):.0f} img/s\n")
    print("| schedule | tokens merged per block | top-1 (%) | Δ (pt) | speed-up (IQR) |")
    print("|---|---|---:|---:|---:|")
    for k in schedules:
        s = speed[k]
        merged = f"{entries[k]} before, then {schedules[k]}" if entries[k] else f"{schedules[k]}"
        print(f"| {k} | {merged} | {top1[k]:.2f} | {top1[k] - top1['unmerged']:+.2f} | "
              f"{s['median']:.2f}× ({s['q25']:.2f}–{s['q75']:.2f}) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"artifact": str(args.artifact), "runtime": args.runtime, "batch": args.batch,
                                        "env": environment(threads), "schedules": schedules, "entry": entries, "top1": top1,
                                        "speedup": speed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
