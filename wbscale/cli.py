"""The ``wbscale`` command: parses arguments and calls the library. No logic here.

User errors (:class:`wbscale.errors.UserError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wbscale.errors import UserError


def _add_recipe_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--config", metavar="PATH", help="recipe YAML file")
    src.add_argument("--recipe", metavar="NAME", help="name of a recipe under recipes/ (see `wbscale recipes list`)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set optim.max_lr=3e-4 (repeatable)",
    )


def _recipe(args: argparse.Namespace):
    from wbscale.config import load_recipe

    return load_recipe(args.config or args.recipe, args.overrides)


# ---------------------------------------------------------------------------- commands


def cmd_fit(args: argparse.Namespace) -> int:
    from wbscale.train.fit import fit, recipe_for_resume

    if args.config or args.recipe:
        recipe = _recipe(args)
    elif args.resume not in ("auto", "never"):
        recipe = recipe_for_resume(Path(args.resume), args.overrides)
    else:
        raise UserError("fit needs --config PATH or --recipe NAME (or --resume CHECKPOINT to continue a run)")
    result = fit(recipe, resume=args.resume, progress=False if args.no_progress else None)
    if not result.already_complete:
        print(f"[wbscale] finished at step {result.step}; run folder: {result.run_dir}", file=sys.stderr)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from wbscale.data.prepare import prepare

    recipe = _recipe(args)
    out = prepare(recipe.data, progress=sys.stderr.isatty(), force=args.force)
    print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from wbscale.data.loader import val_batches
    from wbscale.train.inference import evaluate, load_for_inference

    model, recipe, _ = load_for_inference(args.ckpt, device=args.device)
    data_dir = Path(args.data or recipe.data.out_dir)
    batches = val_batches(data_dir, recipe.model.block_size, args.batch_size, args.batches)
    result = evaluate(model, batches)
    print(json.dumps({"ckpt": str(args.ckpt), "data": str(data_dir), **result}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from wbscale.train.inference import generate_text, load_for_inference

    model, _, tokenizer = load_for_inference(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    if tokenizer is None:
        raise UserError(f"{args.ckpt}: no tokenizer found with this checkpoint; pass --tokenizer PATH/tokenizer.json")
    for i in range(args.num_samples):
        text = generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed + i,
        )
        print(text)
        if i + 1 < args.num_samples:
            print("---")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from wbscale.track.checkpoint_metrics import checkpoint_metrics

    result = checkpoint_metrics(
        args.ckpt, data_dir=args.data, out_dir=args.out, batch_size=args.batch_size, device=args.device
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_ckpt_import(args: argparse.Namespace) -> int:
    from wbscale.train.inference import import_checkpoint

    out = import_checkpoint(args.format, Path(args.file), Path(args.out), tokenizer=args.tokenizer)
    print(out)
    return 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from wbscale.train.checkpoint import inspect_checkpoint

    print(json.dumps(inspect_checkpoint(Path(args.path)), indent=2))
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from wbscale.bench.kernels import main as bench_main

    return bench_main(args.rest)


def cmd_recipes_list(args: argparse.Namespace) -> int:
    from wbscale.config import RECIPES_DIR, load_recipe

    rows = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        r = load_recipe(str(path))
        m = r.model
        rows.append((path.stem, m.arch, f"{m.n_layer}L-{m.n_embd}d-{m.n_head}h", r.data.source, str(r.train.max_steps)))
    header = ("name", "arch", "shape", "data", "steps")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


def cmd_recipes_show(args: argparse.Namespace) -> int:
    from wbscale.config import load_recipe

    print(load_recipe(args.name, args.overrides).to_yaml(), end="")
    return 0


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from wbscale.slurm.submit import submit

    result = submit(
        args.recipe, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        partition=args.partition, account=args.account, time=args.time, qos=args.qos,
        constraint=args.constraint, array=args.array, site_path=args.site, dry_run=args.dry_run,
    )
    if args.dry_run:
        print(result.script, end="")
        return 0
    print(result.job_id)
    print(
        f"wbscale: submitted job {result.job_id} for run folder {result.run_dir} "
        f"(logs: {result.spec.slurm_dir}/); follow it with: wbscale slurm status {result.run_dir}",
        file=sys.stderr,
    )
    return 0


def cmd_slurm_status(args: argparse.Namespace) -> int:
    from wbscale.slurm.status import all_runs, format_status, resolve_run, run_status, status_dicts

    runs = [resolve_run(args.run, args.runs_dir)] if args.run else all_runs(args.runs_dir)
    if not runs:
        raise UserError(f"no run under {args.runs_dir}/ has SLURM jobs; submit one with: wbscale slurm submit RECIPE")
    reports = [(run, run_status(run)) for run in runs]
    if args.json:
        print(json.dumps([status_dicts(run, rows) for run, rows in reports], indent=2))
    else:
        print("\n\n".join(format_status(run, rows) for run, rows in reports))
    return 0


def cmd_slurm_cancel(args: argparse.Namespace) -> int:
    from wbscale.slurm.status import cancel, resolve_run

    run = resolve_run(args.run, args.runs_dir)
    ids = cancel(run)
    print(f"wbscale: cancelled {', '.join(ids)}" if ids else f"wbscale: no queued or running job for {run}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbscale", description="Train and inspect white-box (CRATE) language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="train (or resume) the run a recipe describes")
    _add_recipe_args(p, required=False)
    p.add_argument(
        "--resume", default="auto", metavar="auto|never|PATH",
        help="auto (default): continue from the run's newest checkpoint if any; never: refuse to "
        "reuse a run folder with checkpoints; PATH: a checkpoint folder (its recipe is used if no --config)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize the recipe's data source into shards + manifest")
    _add_recipe_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if data.out_dir holds data of another config")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--data", help="prepared data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("metrics", help="white-box metrics (sparsity, coding rate, …) of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--data", help="prepared data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--out", help="output folder for whitebox.json and PNGs (default: <ckpt>-whitebox next to it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_metrics)

    ckpt = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(dest="ckpt_command", required=True)
    p = ckpt.add_parser("import", help="import a published checkpoint into an export folder")
    p.add_argument("--format", required=True, choices=["crate-lm"], help="crate-lm: the published CRATE LM .pt")
    p.add_argument("file", help="the checkpoint file")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--tokenizer", help="tokenizer.json to store with it (the CRATE LM uses GPT-2's)")
    p.set_defaults(func=cmd_ckpt_import)
    p = ckpt.add_parser("inspect", help="step, topology, size and integrity of a checkpoint")
    p.add_argument("path", help="checkpoint folder or run folder")
    p.set_defaults(func=cmd_ckpt_inspect)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("kernels", help="time the ISTA kernels (see `wbscale bench kernels -h`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench_kernels)

    recipes = sub.add_parser("recipes", help="the recipes shipped under recipes/").add_subparsers(
        dest="recipes_command", required=True
    )
    p = recipes.add_parser("list", help="table of recipes")
    p.set_defaults(func=cmd_recipes_list)
    p = recipes.add_parser("show", help="print a recipe fully resolved")
    p.add_argument("name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_recipes_show)

    slurm = sub.add_parser("slurm", help="run on a SLURM cluster: submit, status, cancel").add_subparsers(
        dest="slurm_command", required=True
    )
    p = slurm.add_parser("submit", help="render the job script for a recipe and sbatch it")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file or name under recipes/")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value (repeatable); saved with the run, so requeued jobs see it too",
    )
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe's distributed.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (default: distributed.devices)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", metavar="HH:MM:SS", help="time limit; the run checkpoints and requeues before it")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--array", metavar="INDEXES", help="job array (e.g. 0-3): task i trains run '<run>-i', seed + i")
    p.add_argument("--site", metavar="FILE", help="site settings (default: ~/.config/wbscale/slurm.yaml if present)")
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")
    p.set_defaults(func=cmd_slurm_submit)
    p = slurm.add_parser("status", help="jobs of a run: state, requeues, last checkpoint step")
    p.add_argument("run", nargs="?", metavar="RUN", help="run folder or run name (default: every run with jobs)")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_slurm_status)
    p = slurm.add_parser("cancel", help="scancel the queued and running jobs of a run (running ones checkpoint first)")
    p.add_argument("run", metavar="RUN", help="run folder or run name")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    p.set_defaults(func=cmd_slurm_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"wbscale: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("wbscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
