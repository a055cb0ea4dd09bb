"""Attention speed against the number of heads and their width, at one parameter count.

Run by hand (the tests only run ``--quick``):

    python benchmarks/attention_heads.py --out runs/bench/attention_heads.json
    python benchmarks/attention_heads.py --quick          # a few seconds: smoke run

Why it exists: per-layer head-dim pruning of the fashion-mnist ViT (``prune.structured`` with
``head_unit: dim``) keeps every block's four heads and narrows them from 24 to 6 dims; its int8
model spent about 45% of its OpenVINO time in the four attention cores (q.kT, softmax, attn.v), as
much as the unpruned model did. This script times one timm ``Attention`` layer at the shape of
``vitc_small`` (96 wide, 50 tokens, batch 16 by default) for layouts that hold the same qkv/proj
parameters (heads x head_dim = 24, the width the pruned blocks keep) and, for reference, the
unpruned 4 x 24. Each layout is exported to ONNX and compiled by OpenVINO (bf16 where the CPU has it,
as the studies deploy it), and also run in eager PyTorch; all layouts are timed in turn, round after
round (``time_interleaved``), and reported as milliseconds per batch and as a ratio to 4 x 24 in
the same rounds. It motivates ``prune.structured``'s ``max_heads``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from timm.models.vision_transformer import Attention

from vitcompress.export.onnx import export_onnx
from vitcompress.measure import environment
from vitcompress.measure.bench import time_interleaved
from vitcompress.measure.runtimes import deploy_openvino, installed

LAYOUTS = ((4, 24), (4, 6), (2, 12), (1, 24), (3, 8), (1, 6))  # (heads, head_dim)


def build(width: int, heads: int, head_dim: int) -> Attention:
    torch.manual_seed(0)
    return Attention(width, num_heads=heads, attn_head_dim=head_dim, qkv_bias=True).eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="two layouts, 2 repeats: a smoke run")
    args = p.parse_args(argv)
    layouts = LAYOUTS[:2] if args.quick else LAYOUTS
    repeats, min_s = (2, 0.02) if args.quick else (args.repeats, 0.3)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.tokens, args.width)
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for h, d in layouts:
            layer = build(args.width, h, d)
            calls[f"eager {h}x{d}"] = lambda layer=layer: layer(x)
            if installed("openvino"):
                path = export_onnx(layer, x, Path(tmp) / f"attn_{h}x{d}.onnx")
                dep = deploy_openvino(path, args.threads)
                calls[f"openvino {h}x{d}"] = lambda fn=dep.fn: fn(x)
        with torch.inference_mode():
            seconds = time_interleaved(calls, warmup=5, repeats=repeats, min_repeat_seconds=min_s)
    first = "{}x{}".format(*layouts[0])
    ref = {rt: seconds[f"{rt} {first}"] for rt in ("eager", "openvino") if f"{rt} {first}" in seconds}
    rows = []
    for name, s in seconds.items():
        rt, layout = name.split()
        ratios = [r / t for r, t in zip(ref[rt], s, strict=True)]  # speed relative to 4x24, round by round
        rows.append({"runtime": rt, "layout": layout, "ms": 1e3 * statistics.median(s),
                     "speed_vs_4x24": statistics.median(ratios)})
    print(f"| runtime | heads x head_dim | ms / batch of {args.batch} | speed vs {first} |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['runtime']} | {r['layout']} | {r['ms']:.3f} | {r['speed_vs_4x24']:.2f}x |")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "env": environment(args.threads), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
