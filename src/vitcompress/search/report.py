"""The search report: every trial, the Pareto front, and the chosen candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _defaults(method: str) -> dict[str, Any]:
    from ..config import to_dict
    from ..methods import get_method

    try:
        return to_dict(get_method(method).config_cls())
    except Exception:  # a method whose config has required fields, or one no longer registered
        return {}


def _chain(row: dict[str, Any]) -> str:
    """The row's steps as ``method(setting=value, ...)``, settings at their defaults left out."""
    steps = row.get("steps") or []
    parts = []
    for s in steps:
        if "method" in s:
            defaults = _defaults(s["method"])
            cfg = ", ".join(f"{k}={v}" for k, v in (s.get("config") or {}).items()
                            if k not in defaults or defaults[k] != v)
            parts.append(f"{s['method']}({cfg})")
        else:
            parts.append(json.dumps(s))
    return " → ".join(parts).replace("|", "\\|") or "baseline"


def reference_img_s(row: dict[str, Any], base: dict[str, Any]) -> float:
    """The baseline images/s a trial is compared with: its fastest runtime, from the trial's own interleaved
    round when the trials were re-timed."""
    same_round = (row.get("timing") or {}).get("baseline_img_s")
    return max(same_round.values()) if same_round else base["cpu_img_s"]


def speedup(row: dict[str, Any], base: dict[str, Any]) -> float:
    """Row images/s over :func:`reference_img_s`; for a re-timed trial, the median of the round-by-round
    ratios against the baseline's fastest runtime in its round (``speedup_paired``)."""
    same_round = (row.get("timing") or {}).get("baseline_img_s")
    paired = row.get("speedup_paired") or {}
    if same_round:
        fastest = max(same_round, key=same_round.__getitem__)
        if fastest in paired:
            return paired[fastest]["median"]
    return row["cpu_img_s"] / reference_img_s(row, base)


def _plot(rows: list[dict[str, Any]], base: dict[str, Any], x: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r.get("status") == "ok"]
    xs = {"size_mb": lambda r: r["size_bytes"] / 1e6, "cpu_img_s": lambda r: r["cpu_img_s"]}[x]
    label = {"size_mb": "size of the saved model (MB)", "cpu_img_s": "CPU throughput (images/s)"}[x]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    off = [r for r in ok if not r.get("pareto")]
    on = sorted((r for r in ok if r.get("pareto")), key=xs)
    ax.scatter([xs(r) for r in off], [r["top1"] for r in off], c="#9aa5b1", label="trial", zorder=2)
    ax.scatter([xs(r) for r in on], [r["top1"] for r in on], c="#d62728", label="Pareto front", zorder=3)
    ax.scatter([xs(base)], [base["top1"]], marker="*", s=180, c="#1f77b4", label="baseline", zorder=4)
    for r in on:
        ax.annotate(str(r["trial"]), (xs(r), r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if ok and max(map(xs, ok + [base])) / max(min(map(xs, ok + [base])), 1e-9) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 on the validation split (%)")
    ax.set_title(f"Search: accuracy vs {label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_search_report(run_dir: Path, recipe: Any, base: dict[str, Any], rows: list[dict[str, Any]],
                        best: dict[str, Any] | None, test_top1: dict[str, float], refit: Any = None) -> Path:
    b = recipe.search.budgets
    max_bytes, min_img_s = b.limits(base)
    budgets = [f"size ≤ {max_bytes / 1e6:.3f} MB" + (f" ({100 * b.max_size_ratio:g}% of the baseline's file)"
                                                     if b.max_size_ratio else "") if max_bytes else None,
               f"CPU ≥ {min_img_s:.0f} img/s" + (f" ({b.min_speedup:g}× the baseline on its fastest runtime, "
                                                 f"{base.get('runtime')})" if b.min_speedup else "")
               if min_img_s else None,
               f"accuracy drop ≤ {b.max_acc_drop} pt" if b.max_acc_drop is not None else None]
    lines = [f"# vitcompress search: {recipe.name}", "",
             f"- Budgets: {', '.join(x for x in budgets if x) or 'none'}",
             f"- Trials: {len(rows)} ({sum(r.get('status') == 'ok' for r in rows)} finished), "
             f"sampler {recipe.search.sampler}, validation split of {base.get('n_test')} training images",
             f"- Baseline {recipe.baseline.name}: {base['top1']:.2f}% on validation, "
             f"{test_top1.get(base['artifact'], float('nan')):.2f}% on the test split, "
             f"{base['size_bytes'] / 1e6:.3f} MB, {base['cpu_img_s']:.1f} img/s", ""]
    if best is not None:
        lines += ["## Chosen candidate (best validation accuracy within the budgets)", "",
                  f"- Trial {best['trial']}: {_chain(best)}",
                  f"- Test top-1: **{test_top1.get(best['artifact'], float('nan')):.2f}%** "
                  f"(validation {best['top1']:.2f}%), size {best['size_bytes'] / 1e6:.3f} MB "
                  f"({100 * best['size_bytes'] / base['size_bytes']:.1f}% of the baseline), "
                  f"CPU {best['cpu_img_s']:.1f} img/s on {best.get('runtime')} "
                  f"({speedup(best, base):.2f}× the baseline's fastest runtime)",
                  f"- Artifact: `{best['artifact']}`", ""]
    else:
        lines += ["## Chosen candidate", "", "No trial met every budget.", ""]
    if refit is not None:
        lines += _refit_lines(refit.rows, b)
    header = ["| Trial | Chain | Val top-1 (%) | Size (MB) | Size ratio | CPU (img/s) | Speed-up (×) | Runtime | "
              "Within budgets | Pareto |", "|---:|---|---:|---:|---:|---:|---:|---|---|---|"]
    front = [r for r in rows if r.get("pareto")]
    lines += ["## Pareto front (accuracy × size × CPU throughput)", "", *header]
    lines += [_row(r, base) for r in sorted(front, key=lambda r: -r["top1"])]
    lines += ["", "## All trials", "", *header]
    lines += [_row(r, base) for r in rows]
    if any((r.get("timing") or {}).get("mode") == "interleaved" for r in rows):
        lines += ["", "CPU speeds: every trial re-timed after the search, interleaved with the baseline in rounds "
                  "of `measure.interleave_group`; the speed-up is the median over those rounds of the trial's "
                  "speed over the baseline's fastest runtime timed just before and after it in that round, and the "
                  "budgets were checked on these numbers."]
    lines += ["", "![accuracy vs size](plots/search_accuracy_vs_size.png)",
              "![accuracy vs throughput](plots/search_accuracy_vs_cpu_speed.png)", ""]
    _plot(rows, base, "size_mb", run_dir / "plots" / "search_accuracy_vs_size.png")
    _plot(rows, base, "cpu_img_s", run_dir / "plots" / "search_accuracy_vs_cpu_speed.png")
    path = run_dir / "search_report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _refit_lines(rows: list[dict[str, Any]], budgets: Any) -> list[str]:
    """The chosen chain re-trained on the whole training split (``search.refit``), from its study's rows."""
    base = next((r for r in rows if r.get("baseline") and r.get("status") == "ok"), None)
    chain = next((r for r in rows if not r.get("baseline")), None)
    lines = ["## Chosen chain refit on the whole training split", "",
             "The chain trained again, from a baseline trained on every training image (validation split "
             "included); both measured on the test split as a study (`refit/report.md`).", ""]
    if base is None or chain is None or chain.get("status") != "ok":
        why = (chain or {}).get("error") or "the refit study has no finished row for it"
        return lines + [f"Refit failed: {why}", ""]
    # The budgets again, against this baseline: the refit model is timed with it in the same rounds.
    reference = reference_img_s(chain, base)
    max_bytes, min_img_s = budgets.limits(base | {"cpu_img_s": reference})
    within = ((max_bytes is None or chain["size_bytes"] <= max_bytes)
              and (min_img_s is None or speedup(chain, base) * reference >= min_img_s)
              and (budgets.max_acc_drop is None or base["top1"] - chain["top1"] <= budgets.max_acc_drop))
    lines += ["| Model | Test top-1 (%) | Δ (pt) | Size (MB) | Size ratio | Speed-up (×) | Runtime | Within budgets |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for r, ok in ((base, ""), (chain, "yes" if within else "no")):
        lines.append(f"| {r['name']} | {r['top1']:.2f} | {r['top1'] - base['top1']:+.2f} | "
                     f"{r['size_bytes'] / 1e6:.3f} | {100 * r['size_bytes'] / base['size_bytes']:.1f}% | "
                     f"{speedup(r, base):.2f} | {r.get('runtime')} | {ok} |")
    return lines + [""]


def _row(r: dict[str, Any], base: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"| {r.get('trial')} | {_chain(r)} | failed: {r.get('error', '')[:80]} | | | | | | | |"
    return (f"| {r['trial']} | {_chain(r)} | {r['top1']:.2f} | {r['size_bytes'] / 1e6:.3f} | "
            f"{100 * r['size_bytes'] / base['size_bytes']:.1f}% | {r['cpu_img_s']:.1f} | {speedup(r, base):.2f} | "
            f"{r.get('runtime')} | {'yes' if r.get('feasible') else 'no'} | {'★' if r.get('pareto') else ''} |")
