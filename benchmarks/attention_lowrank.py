"""Attention approximations on this CPU: when does Nyström / Performer pay, and what do they cost in error?

Run by hand (not part of the tests, which only run ``--quick``):

    python benchmarks/attention_lowrank.py --out runs/bench/attention_lowrank.json
    python benchmarks/attention_lowrank.py --model runs/fashion-mnist/artifacts/<baseline key> --out ...
    python benchmarks/attention_lowrank.py --quick          # a few seconds: smoke run

Three parts, each printed as a table and written to the JSON file given by ``--out``:

1. **One attention layer** (ViT-Ti/16 width: 192 wide, 3 heads of 64; batch 1) at sequence lengths
   from 197 to 4097 tokens (224 to 1024 px images in 16 px patches): exact attention as timm runs it
   (fused ``scaled_dot_product_attention``; also its plain matmul-softmax path) against Nyström
   (m = 24/32/64) and Performer (FAVOR+). Median of repeats at a fixed thread count, the variants
   timed in turn within each round (see `median_ms`); ratios are against exact attention
   measured in the same rounds.
   The crossover is the shortest measured length from which the approximation stays faster, and an
   estimate between the two bracketing lengths (log-log interpolation of the speed ratio).
2. **A whole model** (the ``vitc_tiny`` preset: 192 wide, 6 blocks, 4 px patches) at image sizes giving
   197 to 4097 tokens, every block's attention swapped.
3. **Approximation error on a trained model's real activations**: the inputs of every attention layer
   are recorded on test images; each approximation, built on that layer's trained weights, is
   compared with the exact layer output (relative Frobenius error, mean token cosine), and the whole
   swapped model's test accuracy and top-1 agreement with the exact model are measured (no fine-tune).
   The model is ``--model`` (a vitcompress artifact folder), or else ``vitc_micro`` with 2 px patches
   (197 tokens, the study's length) trained here for ``--train-steps`` steps on Fashion-MNIST and cached
   in ``--work``. Landmark counts at or above the model's token count are skipped (that is exact
   attention); for other lengths the study's ratios m/n = 24/197, 32/197, 64/197 are added.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from vitcompress.measure import environment
from vitcompress.measure.bench import time_interleaved
from vitcompress.methods.lowrank import NystromAttention, PerformerAttention, swap_attention

STUDY_LANDMARKS = (24, 32, 64)
STUDY_TOKENS = 197
PERFORMER_FEATURES = 256


def _variants(landmarks: list[int], features: list[int]) -> dict[str, Any]:
    """name -> build(attn) for every approximation compared."""
    out: dict[str, Any] = {}
    for m in landmarks:
        out[f"nystrom-{m}"] = lambda attn, m=m: NystromAttention.from_attention(attn, m=m)
    for f in features:
        out[f"performer-{f}"] = lambda attn, f=f: PerformerAttention.from_attention(attn, features=f)
    return out


def median_ms(fns: dict[str, Any], rounds: int, min_seconds: float) -> dict[str, float]:
    """Median ms per call of each function, timed in turn round after round by the measurement
    package's `time_interleaved` (a burst of load on a shared machine slows every variant of that
    round, so the ratios hold)."""
    seconds = time_interleaved(fns, warmup=1, repeats=rounds, min_repeat_seconds=min_seconds)
    return {name: 1e3 * statistics.median(v) for name, v in seconds.items()}


# ---- 1. one layer ------------------------------------------------------------------------------
@torch.inference_mode()
def bench_layer(tokens: list[int], dim: int, heads: int, batch: int, repeats: int, min_seconds: float,
                log: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    exact = Attention(dim, num_heads=heads, qkv_bias=True).eval()
    plain = copy.deepcopy(exact)
    plain.fused_attn = False  # timm's own matmul-softmax path, on this instance only
    layers: dict[str, nn.Module] = {"exact-sdpa": exact, "exact-matmul": plain}
    layers |= {name: build(exact).eval() for name, build in _variants(list(STUDY_LANDMARKS), [PERFORMER_FEATURES]).items()}
    rows = []
    for n in tokens:
        x = torch.randn(batch, n, dim)
        # m >= n is exact attention, not an approximation: not timed.
        fns = {name: (lambda layer=layer, x=x: layer(x)) for name, layer in layers.items()
               if not (name.startswith("nystrom-") and layer.landmarks >= n)}
        times = median_ms(fns, repeats, min_seconds)
        row: dict[str, Any] = {"tokens": n} | {name: times.get(name) for name in layers}
        rows.append(row)
        log(_fmt_row(row, "exact-sdpa"))
    return rows


# ---- 2. whole model ----------------------------------------------------------------------------
@torch.inference_mode()
def bench_model(img_sizes: list[int], batch: int, repeats: int, min_seconds: float, log: Any) -> list[dict[str, Any]]:
    from vitcompress.models import ModelSpec, create_model

    rows = []
    for size in img_sizes:
        torch.manual_seed(0)
        base = create_model(ModelSpec("vitc_tiny", img_size=size)).eval()
        n = base.patch_embed.num_patches + base.num_prefix_tokens
        x = torch.randn(batch, 1, size, size)
        variants = _variants(list(STUDY_LANDMARKS), [PERFORMER_FEATURES])
        models: dict[str, nn.Module] = {"exact-sdpa": base}
        for name, build in variants.items():
            if name.startswith("nystrom-") and int(name.split("-")[1]) >= n:
                continue  # exact attention, not an approximation
            models[name] = copy.deepcopy(base).eval()
            swap_attention(models[name], lambda i, attn, build=build: build(attn).eval())
        times = median_ms({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, repeats, min_seconds)
        row: dict[str, Any] = {"tokens": n, "img_size": size, "exact-sdpa": times["exact-sdpa"]}
        row |= {name: times.get(name) for name in variants}
        rows.append(row)
        log(_fmt_row(row, "exact-sdpa"))
    return rows


def crossover(rows: list[dict[str, Any]], name: str, ref: str = "exact-sdpa") -> dict[str, Any]:
    """Shortest measured length from which ``name`` stays faster than ``ref``, and an interpolated estimate."""
    pts = [(r["tokens"], r[ref] / r[name]) for r in rows if r.get(name) is not None]
    if not pts:
        return {"measured": None, "estimate": None, "note": "not measured"}
    first = next((i for i in range(len(pts)) if all(s > 1 for _, s in pts[i:])), None)
    if first is None:
        return {"measured": None, "estimate": None, "note": f"not faster at {pts[-1][0]} tokens"}
    if first == 0:
        return {"measured": pts[0][0], "estimate": None, "note": f"already faster at {pts[0][0]} tokens"}
    (n0, s0), (n1, s1) = pts[first - 1], pts[first]
    t = (0 - math.log(s0)) / (math.log(s1) - math.log(s0))
    est = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return {"measured": n1, "estimate": round(est), "note": f"between {n0} and {n1} tokens"}


# ---- 3. error on real activations --------------------------------------------------------------
def _trained_model(args: argparse.Namespace, log: Any) -> tuple[nn.Module, dict[str, Any], str]:
    from vitcompress.artifact import load_artifact, read_meta, save_artifact
    from vitcompress.models import ModelSpec, create_model

    if args.model:
        meta = read_meta(args.model)
        return load_artifact(args.model), meta["model"], f"artifact {args.model}"
    spec = ModelSpec("vitc_micro", kwargs={"patch_size": 2})  # 197 tokens, as the study's ViT-B/16 at 224 px
    torch.manual_seed(0)
    model = create_model(spec)
    if args.train_steps == 0 or args.quick:
        return model.eval(), spec.to_dict(), "vitc_micro 2 px patches, UNTRAINED (quick run): errors are not meaningful"
    cache = Path(args.work) / f"vitc_micro_p2_{args.train_steps}steps"
    if (cache / "meta.json").exists():
        return load_artifact(cache), spec.to_dict(), f"vitc_micro 2 px patches, trained {args.train_steps} steps (cached {cache})"
    from vitcompress.data import load_split
    from vitcompress.errors import VitcompressError
    from vitcompress.train import TrainConfig, fit

    try:
        train = load_split(args.data, "train")
    except VitcompressError as exc:
        log(f"no training data ({exc}); measuring an untrained model")
        return model.eval(), spec.to_dict(), "vitc_micro 2 px patches, UNTRAINED (no data): errors are not meaningful"
    log(f"training vitc_micro (2 px patches, 197 tokens) for {args.train_steps} steps on {args.data} ...")
    cfg = TrainConfig(epochs=1, batch_size=32, lr=3e-3, warmup_epochs=0.05, mixed_precision="no",
                      train_subset=32 * args.train_steps, max_steps_per_epoch=args.train_steps)
    model = fit(model, train, cfg, work_dir=cache / "work", img_size=28, in_chans=1, progress=False).model
    save_artifact(model, cache, {"model": spec.to_dict(), "steps": []})
    return model.eval(), spec.to_dict(), f"vitc_micro 2 px patches, trained {args.train_steps} steps on {args.data}"


def _test_batch(args: argparse.Namespace, spec: dict[str, Any], n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    from vitcompress.data import load_split, make_loader
    from vitcompress.errors import VitcompressError

    try:
        test = load_split(args.data, "test")
        test = test.subset(torch.arange(min(n, len(test))))
        xs, ys = zip(*make_loader(test, 256, train=False, img_size=spec["img_size"], in_chans=spec["in_chans"]))
        return torch.cat(xs), torch.cat(ys), f"{args.data} test[:{len(test)}]"
    except VitcompressError:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, spec["in_chans"], spec["img_size"], spec["img_size"], generator=g)
        return x, torch.zeros(n, dtype=torch.long), "random images (no test data)"


@torch.inference_mode()
def approximation_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, acts: int,
                        features: list[int], log: Any) -> dict[str, Any]:
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    ms = {m for m in STUDY_LANDMARKS if m < tokens}
    ms |= {max(1, round(m / STUDY_TOKENS * tokens)) for m in STUDY_LANDMARKS}
    ms = sorted(m for m in ms if m < tokens)
    variants = _variants(ms, features)
    mid, prefix = ms[len(ms) // 2], int(model.num_prefix_tokens)
    variants[f"nystrom-{mid}-exact-cls"] = lambda attn: NystromAttention.from_attention(attn, m=mid, exact_prefix=prefix)

    # Inputs of every exact attention layer on real images.
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Attention)]
    seen: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
             for name, mod in layers]
    model(images[:acts])
    for h in hooks:
        h.remove()
    per_layer: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for name, attn in layers:
        x = seen[name]
        y = attn(x)  # (B, N, C)
        for v, build in variants.items():
            y_hat = build(attn).eval()(x)
            rel = ((y_hat - y).norm() / y.norm()).item()
            cos = torch.nn.functional.cosine_similarity(y_hat, y, dim=-1).mean().item()
            per_layer[v].append({"layer": name, "rel_fro": rel, "cosine": cos})

    exact_logits = torch.cat([model(b) for b in images.split(256)])
    out: dict[str, Any] = {"tokens": tokens, "images_for_activations": min(acts, len(images)),
                           "images_for_accuracy": len(images),
                           "exact": {"top1": 100.0 * (exact_logits.argmax(-1) == labels).float().mean().item()}}
    for v, build in variants.items():
        swapped = copy.deepcopy(model)
        swap_attention(swapped, lambda i, attn, build=build: build(attn))
        logits = torch.cat([swapped.eval()(b) for b in images.split(256)])
        out[v] = {
            "rel_fro_mean": statistics.mean(r["rel_fro"] for r in per_layer[v]),
            "cosine_mean": statistics.mean(r["cosine"] for r in per_layer[v]),
            "per_layer": per_layer[v],
            "top1": 100.0 * (logits.argmax(-1) == labels).float().mean().item(),
            "top1_agreement": 100.0 * (logits.argmax(-1) == exact_logits.argmax(-1)).float().mean().item(),
            "logits_rel_fro": ((logits - exact_logits).norm() / exact_logits.norm()).item(),
        }
        log(f"  {v:<26} rel. error {out[v]['rel_fro_mean']:.3f}  cosine {out[v]['cosine_mean']:.3f}  "
            f"top-1 {out[v]['top1']:.1f}% (exact {out['exact']['top1']:.1f}%)  agreement {out[v]['top1_agreement']:.1f}%")
    return out


# ---- printing ----------------------------------------------------------------------------------
def _fmt_row(row: dict[str, Any], ref: str) -> str:
    cells = [f"n={row['tokens']:>5}"]
    for k, v in row.items():
        if k in ("tokens", "img_size"):
            continue
        if v is None:
            cells.append(f"{k} -")
        elif k == ref:
            cells.append(f"{k} {v:.2f} ms")
        else:
            cells.append(f"{k} {v:.2f} ms ({row[ref] / v:.2f}x)")
    return "  ".join(cells)


def _table(rows: list[dict[str, Any]], ref: str) -> str:
    names = [k for k in rows[0] if k not in ("tokens", "img_size")]
    head = f"{'tokens':>7} | " + " | ".join(f"{n:>20}" for n in names)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for n in names:
            v = r.get(n)
            cells.append(f"{'-':>20}" if v is None else f"{v:>9.2f} ms" + (f" {r[ref] / v:>5.2f}x" if n != ref else " " * 7))
        lines.append(f"{r['tokens']:>7} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="a few-second smoke run (tiny sizes, one repeat, untrained model)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (fixed for every timing)")
    p.add_argument("--repeats", type=int, default=7, help="timing rounds (median over rounds)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--model", help="a vitcompress artifact folder whose activations to use (default: train vitc_micro)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--work", default="runs/bench_attention_lowrank", help="where the trained fallback model is cached")
    p.add_argument("--tokens", type=int, nargs="*", help="layer sequence lengths (default 197 ... 4097)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.quick:
        tokens, sizes, repeats, min_s, n_eval, acts, features = [65, 197], [56], 1, 0.0, 32, 8, [64]
    else:
        tokens = args.tokens or [197, 401, 785, 1601, 2305, 3137, 4097]  # 224 ... 1024 px at 16 px patches
        sizes, repeats, min_s, n_eval, acts, features = [56, 112, 160, 256], args.repeats, 0.05, 1000, 64, [64, 256, 1024]

    log(f"== one attention layer (dim 192, 3 heads, batch {args.batch}, {args.threads} threads): median ms, speed-up vs exact-sdpa")
    layer_rows = bench_layer(tokens, 192, 3, args.batch, repeats, min_s, log)
    log(f"== whole model (vitc_tiny: 192 wide, 6 blocks, 4 px patches; batch {args.batch})")
    model_rows = bench_model(sizes, args.batch, repeats, min_s, log)
    approx = [k for k in layer_rows[0] if k.startswith(("nystrom", "performer"))]
    cross = {"layer": {v: crossover(layer_rows, v) for v in approx},
             "model": {v: crossover(model_rows, v) for v in approx}}
    log("== approximation error on real activations")
    model, spec, source = _trained_model(args, log)
    images, labels, data_note = _test_batch(args, spec, n_eval)
    log(f"  model: {source}; images: {data_note}")
    err = approximation_error(model, images, labels, acts=acts, features=features, log=log)

    print("\n" + "=" * 100)
    print(f"One attention layer, median ms (x = speed-up over exact-sdpa), {args.threads} threads")
    print(_table(layer_rows, "exact-sdpa"))
    print(f"\nWhole model (vitc_tiny), median ms per batch of {args.batch}")
    print(_table(model_rows, "exact-sdpa"))
    print("\nCrossover (shortest length from which the approximation stays faster than exact-sdpa)")
    for part, d in cross.items():
        for v, c in d.items():
            print(f"  {part:<5} {v:<16} {c['note']}" + (f", estimate ~{c['estimate']} tokens" if c["estimate"] else ""))
    last = layer_rows[-1]
    print(f"\nAt {last['tokens']} tokens, one layer: " + ", ".join(
        f"{v} {last['exact-sdpa'] / last[v]:.2f}x" for v in approx if last.get(v)))
    print(f"\nError vs exact attention ({source}; {err['tokens']} tokens)")
    print(f"{'variant':<28} {'rel. Frobenius':>14} {'cosine':>8} {'top-1 %':>8} {'agree %':>8}")
    print(f"{'exact':<28} {0.0:>14.3f} {1.0:>8.3f} {err['exact']['top1']:>8.1f} {100.0:>8.1f}")
    for v, e in err.items():
        if isinstance(e, dict) and "rel_fro_mean" in e:
            print(f"{v:<28} {e['rel_fro_mean']:>14.3f} {e['cosine_mean']:>8.3f} {e['top1']:>8.1f} {e['top1_agreement']:>8.1f}")
    seconds = time.perf_counter() - t0
    print(f"\n({seconds:.0f} s)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "benchmark": "attention_lowrank", "quick": args.quick, "env": environment(args.threads),
            "batch": args.batch, "repeats": repeats, "layer": {"dim": 192, "heads": 3, "rows": layer_rows},
            "model": {"preset": "vitc_tiny", "rows": model_rows}, "crossover": cross,
            "error": {"source": source, "data": data_note, **err}, "seconds": seconds,
            "command": " ".join(["python", *sys.argv]),
        }, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
