"""Which student layouts are fast on this CPU: untrained ViTs timed against their teacher's layout.

A distilled student's speed-up is set by its layout, not by its weights, so this times randomly
initialised models (no training, no data) built from a teacher preset with a different width,
head count, depth or conv stem. On the fashion-mnist ViT (50 tokens, batch 16, OpenVINO) the
half-width "tiny" student runs far short of its 4x fewer MACs, and the head count moves the speed
more than the width: this is the script that shows by how much.

    python benchmarks/student_speed.py                       # vitc_small, OpenVINO, the layouts below
    python benchmarks/student_speed.py --layouts w=0.5 w=0.5,h=1 w=0.25 --runtime onnxruntime

A layout is ``key=value`` pairs relative to the teacher: ``w`` its width fraction (stem channels
too, unless ``stem`` says otherwise), ``h`` the head count (default: ``quarter_arch``'s rule), ``d``
the depth, ``stem`` the stem's channel fraction (0: timm's patch projection), ``tok`` 1/0 for a
distillation token (default 1, as the study's DeiT rows). Speed-ups are medians of per-round
ratios to the teacher layout, timed in shuffled rounds with the study's timing code.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from vitcompress.errors import VitcompressError
from vitcompress.measure import Threads, available_cores, count_macs, environment
from vitcompress.measure.bench import paired_ratios, time_interleaved
from vitcompress.measure.runtimes import as_module, deploy
from vitcompress.methods.distill.students import quarter_arch, vitc_deit, vitc_vit
from vitcompress.models.presets import PRESETS

DEFAULT_LAYOUTS = ["w=0.5", "w=0.5,h=1", "w=0.5,h=2", "w=0.5,tok=0", "w=0.5,stem=1", "w=0.5,stem=0",
                   "w=0.5,d=2", "w=0.25", "w=0.25,stem=0.5"]


def parse_layout(text: str, teacher: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The constructor kwargs and the token flag of a layout string (see the module docstring)."""
    opts = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    unknown = set(opts) - {"w", "h", "d", "stem", "tok"}
    if unknown:
        raise SystemExit(f"layout {text!r}: unknown key(s) {sorted(unknown)}; use w, h, d, stem, tok")
    heads = int(opts["h"]) if "h" in opts else None
    stem = float(opts["stem"]) if "stem" in opts else None
    try:  # the distill step's own rule for a student's layout, so what is timed here is what it builds
        arch = quarter_arch(teacher, float(opts.get("w", 1.0)), heads, stem)
    except VitcompressError as err:
        raise SystemExit(f"layout {text!r}: {err}") from None
    if "d" in opts:
        arch["depth"] = int(opts["d"])
    return arch, bool(int(opts.get("tok", 1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="vitc_small", help=f"a preset: {', '.join(PRESETS)}")
    ap.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS)
    ap.add_argument("--runtime", default="openvino", help="torch-eager, onnxruntime or openvino")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    args = ap.parse_args(argv)
    if args.teacher not in PRESETS:
        raise SystemExit(f"unknown teacher preset {args.teacher!r}; use one of {', '.join(PRESETS)}")

    teacher = dict(PRESETS[args.teacher][0])
    img, chans = int(teacher.get("img_size", 28)), 1
    common = {"num_classes": args.num_classes, "in_chans": chans}
    layouts = {"teacher": (dict(teacher), False)} | {t: parse_layout(t, teacher) for t in args.layouts}
    torch.manual_seed(0)
    models = {k: (vitc_deit if tok else vitc_vit)(**arch, **common).eval() for k, (arch, tok) in layouts.items()}
    example = torch.randn(args.batch, chans, img, img, generator=torch.Generator().manual_seed(0))
    threads = args.threads or available_cores()
    work = args.out.parent / "student_deploy" if args.out else Path("runs/bench/student_deploy")
    deps = {k: as_module(deploy(args.runtime, m, example, threads, work / f"l{i}"))
            for i, (k, m) in enumerate(models.items())}
    calls = {k: (lambda fn=fn: fn(example)) for k, fn in deps.items()}
    with torch.inference_mode(), Threads(threads):
        seconds = time_interleaved(calls, warmup=3, repeats=args.repeats, min_repeat_seconds=0.3)

    rows = {}
    for k, m in models.items():
        arch, tok = layouts[k]
        macs = count_macs(m, example[:1])
        rows[k] = {"arch": arch, "dist_token": tok, "params": sum(p.numel() for p in m.parameters()), "macs": macs,
                   "img_s": args.batch / statistics.median(seconds[k]),
                   "speedup": paired_ratios(seconds["teacher"], seconds[k])}
    base = rows["teacher"]
    print(f"{args.teacher} layouts on {args.runtime}, batch {args.batch}, {threads} threads\n")
    print("| layout | width | heads | depth | stem | params | MACs ratio | img/s | speed-up (IQR) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        a, s = r["arch"], r["speedup"]
        macs = f"{base['macs'] / r['macs']:.1f}×" if r["macs"] and base["macs"] else "—"
        print(f"| {k} | {a['embed_dim']} | {a['num_heads']} | {a['depth']} | {a.get('stem', '—')} | {r['params']} | "
              f"{macs} | {r['img_s']:.0f} | {s['median']:.2f}× ({s['q25']:.2f}–{s['q75']:.2f}) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"teacher": args.teacher, "runtime": args.runtime, "batch": args.batch,
                                        "env": environment(threads), "layouts": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
