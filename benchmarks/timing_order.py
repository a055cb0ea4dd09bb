"""Does the order deployments are timed in bias their speed ratios? Copies of one model, timed in turn.

Run by hand (the tests only run ``--quick``):

    python benchmarks/timing_order.py --out runs/bench/timing_order.json
    python benchmarks/timing_order.py --model runs/fashion-mnist/artifacts/<key> --runtime openvino
    python benchmarks/timing_order.py --quick                # seconds: smoke run

``--copies`` separately deployed copies of one model (``--model``: a vitcompress artifact folder
or a timm / preset name, random init; default ``vitc_small``) run the same graph, so every ratio
between them is 1 by construction. The script times them with the study's
:func:`vitcompress.measure.bench.time_interleaved` twice, with the same number of rounds:

1. **fixed order**: every round calls copy 0, then the ``--others`` deployments (other models, as
   a study's rows; none by default), then copy 1, copy 2, ... (how the speed pass ran before it
   shuffled: the baseline was always first, the rows after it);
2. **shuffled**: every round in a fresh seeded random order (the speed pass now).

For each scheme it prints every copy's speed as a ratio to copy 0: the median over rounds of the
within-round ratio and its quartiles (:func:`vitcompress.measure.bench.paired_ratios`). A trend
with the position under the fixed order is the order bias; the spread under the shuffled order is
what is left, the noise a speed-up in a study report carries.

Measured on the fashion-mnist baseline in OpenVINO (docs/results/timing_order): no order effect
beyond ±2% in either scheme, with or without other models between the copies, with static or
dynamic shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitcompress.measure import Threads, environment, runtimes
from vitcompress.measure.bench import load_target, paired_ratios, time_interleaved
from vitcompress.measure.runtimes import as_module, deploy, installed


def measure(args: argparse.Namespace) -> dict[str, Any]:
    target = load_target(args.model)
    runtime = args.runtime or ("openvino" if installed("openvino") else "onnxruntime")
    example = torch.randn(1, target.in_chans, target.img_size, target.img_size)
    batch = example.repeat(args.batch, 1, 1, 1)
    out: dict[str, Any] = {"model": args.model, "runtime": runtime, "copies": args.copies, "rounds": args.rounds,
                           "batch": args.batch, "threads": args.threads, "env": environment(args.threads), "schemes": {}}
    with tempfile.TemporaryDirectory() as work, torch.inference_mode(), Threads(args.threads):
        def add(name: str, model: torch.nn.Module) -> None:
            dep = deploy(runtime, model, example, args.threads, Path(work) / name.replace(" ", "_"))
            fn = as_module(dep)
            fns[name] = lambda: fn(batch)
            out["runtime_label"] = dep.runtime

        fns: dict[str, Any] = {}
        add("copy 0", target.model)
        for j, other in enumerate(args.others):
            add(f"other {j}: {other}", load_target(other).model)
        for i in range(1, args.copies):
            add(f"copy {i}", target.model)
        for scheme, seed in (("fixed order", None), ("shuffled", args.seed)):
            seconds = time_interleaved(fns, warmup=args.warmup, repeats=args.rounds,
                                       min_repeat_seconds=args.min_repeat_seconds, seed=seed)
            out["schemes"][scheme] = {name: paired_ratios(seconds["copy 0"], s) for name, s in seconds.items()}
    return out


def render(result: dict[str, Any]) -> str:
    lines = [f"{result['copies']} copies of {result['model']} on {result.get('runtime_label', result['runtime'])}, "
             f"batch {result['batch']}, {result['threads']} threads, {result['rounds']} rounds per scheme", "",
             "| copy | " + " | ".join(f"{s}: speed / copy 0 (IQR)" for s in result["schemes"]) + " |",
             "|---|" + "---:|" * len(result["schemes"])]
    names = next(iter(result["schemes"].values()))
    for name in names:
        cells = [f"{r[name]['median']:.3f} ({r[name]['q25']:.3f}–{r[name]['q75']:.3f})" for r in result["schemes"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vitc_small", help="artifact folder or timm / preset name (default vitc_small)")
    p.add_argument("--runtime", default=None, help="torch-eager, onnxruntime or openvino (default: openvino if "
                                                   "installed, else onnxruntime)")
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--others", default="", help="comma-separated artifact folders or model names timed between "
                                                "copy 0 and the other copies (same input shape)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-repeat-seconds", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dynamic-shapes", action="store_true",
                   help="OpenVINO: run the dynamic-batch compilation only (as before static shapes were compiled)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--quick", action="store_true", help="vitc_micro, 2 copies, 3 rounds, short repeats")
    args = p.parse_args(argv)
    args.others = [o for o in args.others.split(",") if o]
    if args.dynamic_shapes:
        runtimes.STATIC_SHAPES = 0
    if args.quick:
        args.model, args.copies, args.rounds, args.warmup, args.min_repeat_seconds = "vitc_micro", 2, 3, 1, 0.01
    if args.copies < 2 or args.rounds < 1:
        p.error("--copies must be >= 2 and --rounds >= 1")
    result = measure(args) | {"quick": args.quick, "others": args.others, "dynamic_shapes": args.dynamic_shapes}
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
