"""Speed-up against the baseline at several batch sizes, for rows of a finished study.

A study times every row at one batch size (``measure.batch_size``, 16 in the fashion-mnist
recipe). A small ViT at batch 16 spends much of its time on per-operator overhead rather than
arithmetic, so a model with 3.7x fewer MACs may run only 2x as fast there. This script re-times
saved rows at the batch sizes given, each row's deployment on the runtime the study chose for
it, interleaved with the baseline's deployment on its fastest runtime (shuffled rounds, the
study's timing code), and prints the paired speed-up (median and quartiles of the round-by-round
ratios) per batch size, with the baseline's images/s.

    python benchmarks/batch_scaling.py runs/fm10 --rows "DeiT tiny" "r=0.5" \\
        --batches 1 16 64 256 --out runs/bench/batch_scaling.json

Rows are picked by substring of their name. Nothing is retrained; the deployments in each
artifact's ``deploy/`` folder are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from vitcompress.artifact import load_artifact
from vitcompress.measure import Threads, available_cores, environment
from vitcompress.measure.bench import paired_ratios, time_interleaved
from vitcompress.measure.runtimes import as_module, deploy
from vitcompress.study.results import load_rows
from vitcompress.study.retime import runtime_name
from vitcompress.study.runner import read_run_info


def _deployment(run_dir: Path, row: dict[str, Any], example: torch.Tensor, threads: int) -> Any:
    art = run_dir / Path(row["artifact"]).parent
    name = runtime_name(row["runtime"])
    if name is None:
        raise SystemExit(f"row '{row['name']}' ran on {row['runtime']}, which this script cannot deploy")
    return as_module(deploy(name, load_artifact(art), example, threads, art / "deploy"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished study's run folder")
    ap.add_argument("--rows", nargs="+", required=True, help="substrings of the row names to time")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--min-repeat-seconds", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    args = ap.parse_args(argv)

    rows = [r for r in load_rows(args.run_dir / "results.jsonl") if r.get("status") == "ok"]
    base = next((r for r in rows if r.get("baseline")), None)
    if base is None:
        raise SystemExit(f"{args.run_dir}/results.jsonl has no finished baseline row; run the study first")
    picked = [r for r in rows if not r.get("baseline") and any(s in r["name"] for s in args.rows)]
    if not picked:
        raise SystemExit(f"no finished row's name contains any of {args.rows}; see {args.run_dir}/report.md")
    threads = args.threads or available_cores()
    info = read_run_info(args.run_dir)
    from vitcompress.study import load_recipe

    spec = load_recipe(info["source"] or info["recipe"]).model_spec() if info.get("recipe") else None
    shape = (spec.in_chans, spec.img_size, spec.img_size) if spec else (1, 28, 28)
    example = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    deps = {r["name"]: _deployment(args.run_dir, r, example, threads) for r in [base, *picked]}

    result: dict[str, Any] = {"run_dir": str(args.run_dir), "env": environment(threads),
                              "runtimes": {r["name"]: r["runtime"] for r in [base, *picked]}, "batches": {}}
    for b in args.batches:
        x = example[:1].repeat(b, 1, 1, 1)
        calls = {name: (lambda fn=fn, x=x: fn(x)) for name, fn in deps.items()}
        with torch.inference_mode(), Threads(threads):
            seconds = time_interleaved(calls, warmup=2, repeats=args.repeats,
                                       min_repeat_seconds=args.min_repeat_seconds)
        result["batches"][b] = {
            "baseline_img_s": b / statistics.median(seconds[base["name"]]),
            "speedup": {r["name"]: paired_ratios(seconds[base["name"]], seconds[r["name"]]) for r in picked},
        }
        print(f"batch {b}: done", file=sys.stderr)

    print(f"Speed-up against {base['name']} on {base['runtime']} (median of paired rounds, IQR), "
          f"{threads} threads\n")
    print("| Row | runtime | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|---|" + "---:|" * len(args.batches))
    print(f"| {base['name']} (images/s) | {base['runtime']} | "
          + " | ".join(f"{result['batches'][b]['baseline_img_s']:.0f}" for b in args.batches) + " |")
    for r in picked:
        cells = []
        for b in args.batches:
            s = result["batches"][b]["speedup"][r["name"]]
            cells.append(f"{s['median']:.2f}× ({s['q25']:.2f}–{s['q75']:.2f})")
        print(f"| {r['name']} | {r['runtime']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
