"""The ``vitcompress`` command: a thin layer over the library.

Each subcommand parses its arguments, calls the public API and prints. Errors
that the user can fix are one line on stderr and exit code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import VitcompressError


def _cmd_study(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .report import render_terminal_table
    from .study import load_recipe, run_study

    recipe = _with_data(load_recipe(args.recipe), args.data)
    if args.log_with:
        from dataclasses import replace

        from .track import TRACKERS

        names = [n.strip() for n in args.log_with.split(",") if n.strip()]
        bad = [n for n in names if n not in (*TRACKERS, "all")]
        if bad or not names:
            raise VitcompressError(f"--log-with takes {', '.join(TRACKERS)} or all (comma-separated); got "
                                   f"{args.log_with!r}")
        recipe = replace(recipe, tracking=replace(recipe.tracking, log_with=names))
    # Piped output (CI logs, `| tee`) gets a table 120 columns wide instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 120)
    quiet = {"log": lambda message: None} if args.quiet else {}
    result = run_study(recipe, args.out, data_root=args.data_root, download=args.download or None,
                       progress=not (args.no_progress or args.quiet), debug=args.debug, executor=args.executor,
                       address=args.address, keep_train_state=args.keep_train_state, **quiet)
    if not result.report:  # a non-main process of `accelerate launch`: the main one prints
        return 0
    if not args.quiet:
        console.print(render_terminal_table(result.rows))
    console.print(_report_line(result.report))
    failed = [r["name"] for r in result.rows if r.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} experiment(s) failed: {', '.join(failed)} (the report says why)", file=sys.stderr)
    return 1 if failed else 0


def _with_data(recipe: Any, data: str | None) -> Any:
    """The recipe with ``--data`` as its dataset (a bundled name, an image folder, hf:PATH), checked again."""
    if data is None:
        return recipe
    from dataclasses import replace

    from .data import data_config_from_arg
    from .study.recipe import check_models

    out = replace(recipe, data=data_config_from_arg(data, recipe.data))
    check_models(out)
    return out


def _cmd_search(args: argparse.Namespace) -> int:
    from .search.runner import run_search
    from .study import load_recipe

    result = run_search(_with_data(load_recipe(args.recipe), args.data), args.out, trials=args.trials,
                        data_root=args.data_root,
                        progress=not args.no_progress)
    if result.best is not None:
        print(f"best within budgets: trial {result.best['trial']} ({result.best['method']}), "
              f"val top1 {result.best['top1']:.2f}%")
    else:
        print("no trial met every budget")
    print(f"report: {result.report}")
    return 0


def _report_line(paths: dict[str, Any]) -> str:
    """Where a rendered run's report is: the Markdown, the HTML beside it, and the plots' folder."""
    plots = f" (plots in {Path(paths['plots'][0]).parent}/)" if paths.get("plots") else ""
    html = f" and {paths['html']}" if paths.get("html") else ""
    return f"report: {paths['report']}{html}{plots}"


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import read_results
    from .study.runner import read_run_info, render_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "results.jsonl").exists():
        raise VitcompressError(f"{run_dir} has no results.jsonl; pass a run folder made by `vitcompress study`")
    try:
        info = read_run_info(run_dir)
    except VitcompressError as exc:  # the rows are what a report needs; say what is missing from its header
        print(f"warning: {exc}", file=sys.stderr)
        info = {}
    meta = {key: info[key] for key in ("recipe", "command", "data", "classes", "inputs") if info.get(key)}
    paths = render_run(run_dir, read_results(run_dir / "results.jsonl"), meta)
    print(_report_line(paths))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .methods import list_methods
    from .models import PRESETS
    from .study import bundled_recipes

    print("methods (and the architectures each runs on):")
    for m in list_methods():
        print(f"  {m.name:<18} {m.family:<14} {m.summary}")
        print(f"  {'':<18} {'':<14} runs on: {m.supports}")
    print("models: a preset below, any timm name (pretrained tags too), hf-hub:org/name, or a transformers "
          "ViT/DeiT classifier folder")
    for name, (_, text) in PRESETS.items():
        print(f"  {name:<18} {text}")
    print("recipes:", ", ".join(bundled_recipes()))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .study import load_recipe

    for item in args.recipes:
        r = load_recipe(item)
        print(f"{item}: ok ({len(r.experiments) + 1} rows: {r.baseline.name}, "
              f"{', '.join(e.name for e in r.experiments) or 'no experiments'})")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise VitcompressError(f"{flag} takes comma-separated integers like 1,16; got {text!r}") from None


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from .measure.bench import BenchConfig, json_safe, load_target, render_bench_table, run_bench

    cfg = BenchConfig(runtimes=tuple(r.strip() for r in args.runtimes.split(",") if r.strip()),
                      batch_sizes=_int_list(args.batch_sizes, "--batch-sizes"), threads=args.threads,
                      repeats=args.repeats, warmup=args.warmup, latency_samples=args.latency_samples,
                      min_repeat_seconds=args.min_repeat_seconds, device=args.device)
    target = load_target(args.target, checkpoint=args.checkpoint, img_size=args.img_size, in_chans=args.in_chans,
                         num_classes=args.num_classes)
    result = run_bench(target, cfg, progress=not args.no_progress)
    Console(width=None if sys.stdout.isatty() else 160).print(render_bench_table(result))
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        print(f"json: {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .export.files import export_files, parity_images, parse_formats, write_deploy_info, write_summary
    from .measure.bench import load_target

    formats = parse_formats(args.formats)
    target = load_target(args.target, checkpoint=args.checkpoint, img_size=args.img_size, in_chans=args.in_chans,
                         num_classes=args.num_classes)
    images, described = parity_images(target.img_size, target.in_chans, args.images, args.data, args.data_root,
                                      preprocess=target.preprocess)
    entries = export_files(target.model, args.out, formats, images, threads=args.threads)
    extra = write_deploy_info(args.out, target.preprocess, target.classes)
    path = write_summary(args.out, {"target": target.source, "model": target.label, "inputs": described,
                                    "preprocess": target.preprocess, "classes": target.classes,
                                    "files": [str(f) for f in extra], "exports": entries})
    table = Table(title=f"vitcompress export: {target.label}", caption=f"parity against PyTorch eager on {described}")
    for col in ("Format", "Files", "MB", "Runtime", "Top-1 agree", "max |Δlogit|", "Cosine"):
        table.add_column(col, justify="right" if col not in ("Format", "Files", "Runtime") else "left")
    for e in entries:
        table.add_row(e["format"], ", ".join(Path(f).name for f in e["files"]), f"{e['bytes'] / 1e6:.2f}",
                      e["runtime"], f"{e['top1_agreement']:.3f}", f"{e['max_abs_logit_err']:.2e}",
                      f"{e['cosine']:.5f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"json: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="vitcompress", description="Compress Vision Transformers and measure the result.",
        epilog="exit status: 0 done; 1 an experiment failed (its row says why); 2 bad input or environment (one "
               "line says what to do); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): run the same command "
               "again to resume")
    p.add_argument("--version", action="version", version=f"vitcompress {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and stop at the first failed experiment")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("study", help="run or resume a study (default recipe: quick)")
    s.add_argument("recipe", nargs="?", default="quick", help="bundled recipe name or path to a YAML recipe")
    s.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
    s.add_argument("--data", default=None, metavar="DATA",
                   help="the dataset instead of the recipe's: a bundled name, an image folder (DIR with train/<class>/ "
                        "and val/<class>/), or hf:PATH (a Hugging Face dataset: a save_to_disk folder or a hub name)")
    s.add_argument("--data-root", default=None, help="folder holding the dataset files")
    s.add_argument("--download", action="store_true", help="download the dataset when online")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--quiet", action="store_true", help="print only the report's path, warnings and errors")
    s.add_argument("--log-with", default=None, metavar="TRACKERS",
                   help="log the run to experiment trackers: tensorboard, mlflow, wandb or all, comma-separated "
                        "(local folders in the run folder by default; the recipe's tracking.log_with otherwise)")
    s.add_argument("--keep-train-state", action="store_true",
                   help="keep each training's last checkpoint (train_state.pt) after its model is saved")
    s.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run experiments one by one here (default) or as Ray tasks")
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    s.set_defaults(func=_cmd_study)

    se = sub.add_parser("search", help="search chains of methods under the recipe's budgets (resumable)")
    se.add_argument("recipe", help="bundled recipe name or path to a YAML recipe with a 'search' section")
    se.add_argument("--out", default=None, help="run folder (default runs/<recipe name>-search)")
    se.add_argument("--trials", type=int, default=None, help="number of trials (default: the recipe's)")
    se.add_argument("--data", default=None, metavar="DATA", help="the dataset instead of the recipe's (as for study)")
    se.add_argument("--data-root", default=None, help="folder holding the dataset files")
    se.add_argument("--no-progress", action="store_true", help="no progress bars")
    se.set_defaults(func=_cmd_search)

    r = sub.add_parser("report", help="re-render report.md, results.csv and plots from a run folder")
    r.add_argument("run_dir")
    r.set_defaults(func=_cmd_report)

    ls = sub.add_parser("list", help="list methods, model presets and bundled recipes")
    ls.set_defaults(func=_cmd_list)

    b = sub.add_parser("bench", help="time an artifact or a timm model on each runtime and batch size")
    b.add_argument("target", help="artifact folder (run_dir/artifacts/<key>), a timm model name, or a transformers "
                                  "model folder")
    b.add_argument("--runtimes", default="auto",
                   help="auto, all, or comma-separated names: torch-eager, torch-compile, onnxruntime, openvino "
                        "(default auto: where the model deploys)")
    b.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    b.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="cpu (default), cuda (PyTorch runtimes on the GPU), or auto (cpu, plus cuda when present)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core available)")
    b.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported (default 7)")
    b.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    b.add_argument("--latency-samples", type=int, default=50, help="single-image calls for p50/p95 (default 50)")
    b.add_argument("--min-repeat-seconds", type=float, default=0.2,
                   help="each repeat loops calls until it lasts this long (default 0.2)")
    b.add_argument("--checkpoint", default=None, help="weights for a timm model name (.safetensors or .pth)")
    b.add_argument("--img-size", type=int, default=None, help="input size for a timm model name (default: its own)")
    b.add_argument("--in-chans", type=int, default=None, help="input channels for a timm model name")
    b.add_argument("--num-classes", type=int, default=None, help="classes for a timm model name")
    b.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON to OUT")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser("export", help="write an artifact or a timm model as ONNX and OpenVINO IR, checked against "
                                      "PyTorch")
    e.add_argument("target", help="artifact folder (run_dir/artifacts/<key>), a timm model name, or a transformers "
                                  "model folder")
    e.add_argument("--out", required=True, help="folder for the files and export.json")
    e.add_argument("--formats", default="onnx,openvino", help="comma-separated: onnx, openvino (default both)")
    e.add_argument("--data", default=None, help="dataset whose first test images check parity: a bundled name, an "
                                                "image folder or hf:PATH (default: seeded random images)")
    e.add_argument("--data-root", default=None, help="folder holding the dataset files")
    e.add_argument("--images", type=int, default=256, help="images for the parity check (default 256)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core available)")
    e.add_argument("--checkpoint", default=None, help="weights for a timm model name (.safetensors or .pth)")
    e.add_argument("--img-size", type=int, default=None, help="input size for a timm model name (default: its own)")
    e.add_argument("--in-chans", type=int, default=None, help="input channels for a timm model name")
    e.add_argument("--num-classes", type=int, default=None, help="classes for a timm model name")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("validate", help="check recipes without running them")
    v.add_argument("recipes", nargs="+")
    v.set_defaults(func=_cmd_validate)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, a container stopping), handled as Ctrl-C is."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    if not args.debug:
        # torch.ao's quantized tensors warn that they are deprecated on every use; the CLI's
        # output is a report, not a log, and the Python API still shows the warning.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        code = int(args.func(args) or 0)
        if "torch" in sys.modules:  # a command that used torch may have joined a process group
            from . import dist

            dist.shutdown()
        return code
    except VitcompressError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}: finished rows are saved; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a path the file system refuses (too long, no permission, a disk full, ...)
        if args.debug:
            raise
        from .errors import StorageError, storage_fault

        fault = storage_fault(exc)
        if fault is not None:
            print(f"error: {StorageError(exc.filename or '.', fault)}", file=sys.stderr)
            return 2
        where = f" {str(exc.filename)[:120]}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
