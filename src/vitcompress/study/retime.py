"""The speed pass: every row's throughput re-timed interleaved with the baseline's, so speed-ups are same-run ratios.

Each row is first timed on its own, right after it is built. On a shared or
thermally throttled machine those numbers drift over a long study (we measured the
same ONNX graph at 1393 and 2701 images/s in two rows of one run), and a speed-up
over a baseline timed an hour earlier carries that drift. So once every row is
measured, the study re-times them: in groups of ``measure.interleave_group`` rows,
each group together with the baseline, every deployment of the group called in
turn repeat after repeat, so a burst of load slows the whole round rather than one row;
the baseline in its reference runtime (the anchor) is timed again between every two
deployments (:func:`vitcompress.measure.bench.time_anchored`). Every runtime a row ran in
is re-timed; the row's speed becomes its fastest runtime's interleaved median (its
accuracy, as before, is the accuracy measured in that runtime), and its speed-up is
against the baseline's numbers from the same group: the median, over the rounds, of
the ratio of each repeat to the anchor's repeats just before and after it (for the
baseline's other runtimes, to their repeat in the same round) (``speedup_paired``: median
and quartiles per baseline runtime), so load that comes and goes cancels out. The isolated numbers stay in the
row (``cpu_img_s_isolated``) and ``timing`` says how each speed was taken.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..artifact import load_artifact
from ..errors import VitcompressError
from ..measure import Threads
from ..measure.bench import latency_interleaved, paired_ratios, time_anchored
from ..measure.runtimes import RUNTIMES, as_module, deploy
from .results import add_warning

INTERLEAVED = "interleaved"


def runtime_name(label: str) -> str | None:
    """The runtime a row's runtime label (``onnxruntime-cpu``, ``openvino-cpu-bf16``) was deployed with."""
    return next((r for r in RUNTIMES if label == f"{r}-cpu" or label.startswith(f"{r}-cpu-")), None)


def primary_runtime(runtimes: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The runtime that makes a row (the fastest one that ran) and its measurements."""
    ran = {k: v for k, v in runtimes.items() if "error" not in v}
    primary = max(ran, key=lambda k: ran[k]["cpu_img_s"])
    return primary, ran[primary]


def pick_primary(row: dict[str, Any]) -> None:
    """Make the row's headline numbers those of its fastest runtime (accuracy included)."""
    primary, best = primary_runtime(row["runtimes"])
    row["runtime"] = primary
    for key in ("top1", "top5", "n_test", "cpu_img_s", "cpu_img_s_b1", "latency_ms_p50", "latency_ms_p95",
                "int_arithmetic", "float_parts", "speedup_paired"):
        if key in best:
            row[key] = best[key]


def needs_retime(rows: list[dict[str, Any]]) -> bool:
    ok = [r for r in rows if r.get("status") == "ok"]
    return len(ok) > 1 and any((r.get("timing") or {}).get("mode") != INTERLEAVED for r in ok)


def retime_rows(rows: list[dict[str, Any]], run_dir: Path, example: torch.Tensor, cfg: Any,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Re-time the ok rows (see the module doc); returns all rows, the ok ones updated. The baseline row is first."""
    ok = [r for r in rows if r.get("status") == "ok"]
    base = next((r for r in ok if r.get("baseline")), None)
    if base is None or len(ok) < 2:
        return rows
    others = [r for r in ok if r is not base]
    size = max(1, cfg.interleave_group - 1)
    threads = cfg.resolved_threads()
    batch = example[:1].repeat(cfg.batch_size, *([1] * (example.dim() - 1)))
    one = example[:1]

    untimed: set[str] = set()

    def deployments(row: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        """One callable per runtime the row ran in, keyed by ``[row name, runtime label]`` (JSON); none when its
        artifact is missing or changed (the row keeps the speed it had, with a warning saying why)."""
        art = run_dir / Path(row["artifact"]).parent
        try:
            model = load_artifact(art)
        except VitcompressError as exc:
            if row is base:
                raise
            log(f"speed pass: {row['name']} is not re-timed: {exc}")
            add_warning(row, f"not re-timed in the last speed pass ({str(exc).split(';')[0]}); its speed is from "
                             "an earlier one")
            untimed.add(row["name"])
            return {}
        out = {}
        for label, entry in row["runtimes"].items():
            name = runtime_name(label)
            if "error" not in entry and name is not None:
                out[json.dumps([row["name"], label])] = as_module(deploy(name, model, example, threads, art / "deploy"))
        return out

    base_fns = deployments(base)  # deployed once, timed in every group
    # The anchor: the baseline in its reference runtime (its fastest as measured on its own; for a float
    # baseline, its fastest float runtime), timed around every other deployment (``time_anchored``).
    anchor_label = base["runtime"] if json.dumps([base["name"], base["runtime"]]) in base_fns else \
        json.loads(next(iter(base_fns)))[1]
    anchor = json.dumps([base["name"], anchor_label])
    for g, start in enumerate(range(0, len(others), size)):
        group = [base, *others[start:start + size]]
        log(f"speed pass, group {g + 1}/{-(-len(others) // size)}: {len(group)} rows interleaved with the baseline")
        fns = dict(base_fns)
        for row in group[1:]:
            fns.update(deployments(row))
        calls = {key: (lambda fn=fn: fn(batch)) for key, fn in fns.items()}
        singles = {key: (lambda fn=fn: fn(one)) for key, fn in fns.items()}
        with torch.inference_mode(), Threads(threads):
            per_batch, around = time_anchored(calls, anchor, warmup=cfg.warmup, repeats=cfg.repeats,
                                              min_repeat_seconds=cfg.min_repeat_seconds)
            latency = latency_interleaved(singles, cfg.latency_samples)
        base_here: dict[str, float] = {}  # the baseline's images/s per runtime label in this group
        timed = [(key, *json.loads(key), seconds) for key, seconds in per_batch.items()]  # key, row name, label, s
        # The baseline's other runtimes pair with a row's repeat by round; its reference runtime (the anchor)
        # by the repeats just around it.
        base_seconds = {label: seconds for key, name, label, seconds in timed if name == base["name"] and key != anchor}
        for key, name, label, seconds in timed:
            row = next(r for r in group if r["name"] == name)
            img_s = cfg.batch_size / statistics.median(seconds)
            if key == anchor:  # several repeats a round: their median stands for the round
                per_round = len(seconds) // cfg.repeats
                seconds = [statistics.median(seconds[i:i + per_round]) for i in range(0, len(seconds), per_round)]
            if row is base:
                base_here[label] = img_s
                if g > 0:
                    continue  # the baseline row keeps the numbers of the first group
            entry = row["runtimes"][label]
            entry.setdefault("cpu_img_s_isolated", entry["cpu_img_s"])
            entry["cpu_img_s"] = img_s
            entry.update(latency[key])
            paired = {b: paired_ratios(v, seconds) for b, v in base_seconds.items()}
            paired[anchor_label] = paired_ratios(around[key], seconds) if key != anchor else {
                "q25": 1.0, "median": 1.0, "q75": 1.0}
            entry["speedup_paired"] = {b: paired[b] for b in sorted(paired)}
        for row in group[1:]:
            if row["name"] in untimed:
                continue
            row.setdefault("cpu_img_s_isolated", row["cpu_img_s"])
            row["timing"] = {"mode": INTERLEAVED, "group": g, "baseline_img_s": base_here, "anchor": anchor_label}
            pick_primary(row)
    base.setdefault("cpu_img_s_isolated", base["cpu_img_s"])
    base["timing"] = {"mode": INTERLEAVED, "group": 0, "anchor": anchor_label}
    pick_primary(base)
    base["timing"]["baseline_img_s"] = {k: v["cpu_img_s"] for k, v in base["runtimes"].items() if "error" not in v}
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``results.jsonl`` with ``rows`` (a temporary file renamed over it: never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
