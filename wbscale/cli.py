"""The ``wbscale`` command: parses arguments and calls the library. No logic here.

One grammar: every verb that runs a recipe (``fit``, ``data prepare``, ``recipes show|check``,
``bench train|data``, ``slurm submit``, ``bimt toy``, ``sweep run``) takes ``RECIPE`` (a name
under recipes/ or a YAML path; ``--config PATH`` / ``--recipe NAME`` are older spellings) and
``--set KEY=VALUE`` from one parent parser; ``--device`` defaults to ``auto`` everywhere.
``wbscale sweep RECIPE …`` is short for ``wbscale sweep run RECIPE …``.

User errors (:class:`wbscale.errors.UserError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wbscale import __version__
from wbscale.errors import UserError


def _recipe_parent() -> argparse.ArgumentParser:
    """The one ``RECIPE [--set KEY=VALUE …]`` grammar every verb that runs a recipe shares (``parents=``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.set_defaults(recipe_required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "recipe", nargs="?", metavar="RECIPE",
        help="a recipe name under recipes/ (see `wbscale recipes list`) or a recipe YAML path",
    )
    src.add_argument("--config", metavar="PATH", help="the same as RECIPE (older spelling, for a YAML path)")
    src.add_argument("--recipe", dest="recipe_name", metavar="NAME", help="the same as RECIPE (older spelling, for a name)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set optim.max_lr=3e-4 (repeatable; "
        "with `sweep run`, comma-separated values make an axis of the grid)",
    )
    return p


def _device_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N")
    return p


def _recipe_source(args: argparse.Namespace) -> str | None:
    return args.recipe or args.config or args.recipe_name


def _recipe(args: argparse.Namespace):
    from wbscale.config import load_recipe

    return load_recipe(_recipe_source(args), args.overrides)


def _device(name: str) -> str:
    from wbscale.hardware import resolve_device

    return resolve_device(name)


class _Parser(argparse.ArgumentParser):
    """argparse with wbscale's error format: one line, exit status 2, where to get help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


# ---------------------------------------------------------------------------- commands


def cmd_fit(args: argparse.Namespace) -> int:
    from wbscale.ranks import say
    from wbscale.train.fit import fit, recipe_for_resume

    if _recipe_source(args):
        recipe = _recipe(args)
    elif args.resume not in ("auto", "never"):
        recipe = recipe_for_resume(Path(args.resume), args.overrides)
    else:
        raise UserError("fit needs a RECIPE (a name under recipes/ or a YAML path), or --resume CHECKPOINT to continue a run")
    from wbscale.runs.recorder import recording_failures

    with recording_failures(recipe):
        result = fit(recipe, resume=args.resume, progress=False if args.no_progress else None)
    if not result.already_complete:
        say(f"finished at step {result.step}; run folder: {result.run_dir}")  # rank 0 only
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from wbscale.data.prepare import prepare

    recipe = _recipe(args)
    out = prepare(recipe.data, progress=True, force=args.force)  # a bar on a terminal, plain lines otherwise
    print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from wbscale.ckpt.load import load_for_inference, require_training_data
    from wbscale.data.loader import val_batches
    from wbscale.inference import evaluate

    model, recipe, _ = load_for_inference(args.ckpt, device=_device(args.device))
    data_dir = require_training_data(args.ckpt, args.data)
    batches = val_batches(data_dir, recipe.model.block_size, args.batch_size, args.batches)
    result = evaluate(model, batches)
    print(json.dumps({"ckpt": str(args.ckpt), "data": str(data_dir), **result}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from wbscale.ckpt.load import load_for_inference
    from wbscale.inference import check_generate_options, generate_text

    check_generate_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples)
    model, _, tokenizer = load_for_inference(args.ckpt, tokenizer=args.tokenizer, device=_device(args.device))
    if tokenizer is None:
        raise UserError(f"{args.ckpt}: no tokenizer found with this checkpoint; pass --tokenizer PATH/tokenizer.json")
    for i in range(args.num_samples):
        text = generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed + i,
            top_p=args.top_p, stop=not args.no_stop, use_cache=not args.no_cache,
        )
        print(text)
        if i + 1 < args.num_samples:
            print("---")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from wbscale.track.checkpoint_metrics import checkpoint_metrics

    result = checkpoint_metrics(
        args.ckpt, data_dir=args.data, out_dir=args.out, batch_size=args.batch_size, device=_device(args.device)
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_ckpt_import(args: argparse.Namespace) -> int:
    from wbscale.ckpt.load import import_checkpoint

    out = import_checkpoint(args.format, Path(args.file), Path(args.out), tokenizer=args.tokenizer)
    print(out)
    return 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from wbscale.ckpt.format import inspect_checkpoint

    report = inspect_checkpoint(Path(args.path))
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok") else 1  # a damaged checkpoint: the report says why, the status says so


def cmd_ckpt_consolidate(args: argparse.Namespace) -> int:
    from wbscale.ckpt.consolidate import consolidate

    print(consolidate(Path(args.path), Path(args.out), dtype=args.dtype))
    return 0


def cmd_ckpt_export(args: argparse.Namespace) -> int:
    from wbscale.ckpt.export_hf import export_hf

    print(export_hf(Path(args.path), Path(args.out), dtype=args.dtype, tokenizer=args.tokenizer))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from wbscale.evaluate.harness import evaluate_tasks

    result = evaluate_tasks(
        args.path, args.tasks.split(","), device=_device(args.device), batch_size=args.batch_size,
        limit=args.limit, dtype=args.dtype, num_fewshot=args.num_fewshot, include_path=args.include_path,
        out=args.out, tokenizer=args.tokenizer, wandb_log=not args.no_wandb,
    )
    print(result["table"], end="")
    logged = f"; logged to the run's wandb ({result['wandb']})" if result["wandb"] else ""
    print(f"wbscale: results written to {result['path']}{logged}", file=sys.stderr)
    return 0


def cmd_recipes_check(args: argparse.Namespace) -> int:
    from wbscale.train.memory import check_recipe, format_report

    report = check_recipe(_recipe(args), nodes=args.nodes, devices=args.devices, gpu=args.gpu)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["configured_fits"] or not args.strict else 1


def cmd_bench_train(args: argparse.Namespace) -> int:
    from wbscale.bench.train import bench_archs, format_report

    overrides = list(args.overrides)
    if args.devices is not None:
        overrides.append(f"distributed.devices={args.devices}")
    archs = [a.strip() for a in args.arch.split(",")] if args.arch else []
    if not archs:
        from wbscale.config import load_recipe

        archs = [load_recipe(_recipe_source(args), overrides).model.arch]
    reports = bench_archs(_recipe_source(args), overrides, archs, steps=args.steps, warmup=args.warmup, out_dir=Path(args.out))
    for report in reports:  # rank 0 only
        print(format_report(report))
        print(report["path"])
    if len(reports) > 1:
        base = reports[0]
        for other in reports[1:]:
            print(
                f"{base['model']} / {other['model']}: tokens/s ratio "
                f"{base['tokens_per_second'] / other['tokens_per_second']:.2f} (same run, same device)"
            )
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from wbscale.bench.kernels import bench_kernels, failed_correctness

    path = bench_kernels(
        variant=args.variant, dtype=args.dtype, tokens=args.tokens, dims=args.d, out_dir=args.out,
        save_activations=not args.no_save_activations,
    )
    print(f"wrote {path}")
    bad = failed_correctness(path)
    if bad:
        print(f"kernel correctness check failed for {len(bad)} shape(s): see {path}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from wbscale.bench.data import bench_prepare

    print(json.dumps(bench_prepare(_recipe(args).data, repeats=args.repeats, workers=args.workers), indent=2))
    return 0


def cmd_bench_bimt(args: argparse.Namespace) -> int:
    from wbscale.bench.bimt import bench_bimt

    print(json.dumps(bench_bimt(_device(args.device), top_k=args.top_k, batch=args.batch, seq=args.seq), indent=2))
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from wbscale.bench.gpu import run_from_args

    return run_from_args(args)


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from wbscale.bench.generate import bench_generate

    result = bench_generate(
        archs=[a.strip() for a in args.arch.split(",") if a.strip()], n_layer=args.n_layer, n_embd=args.n_embd,
        n_head=args.n_head, block_size=args.block_size, vocab_size=args.vocab_size, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, repeats=args.repeats, device=_device(args.device),
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench_interpret(args: argparse.Namespace) -> int:
    from wbscale.bench.interpret import bench_interpret

    result = bench_interpret(
        args.ckpt, args.data, tokens=args.tokens, batch_size=args.batch_size, device=_device(args.device),
        repeats=args.repeats, layers=args.layers,
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_bimt_plot(args: argparse.Namespace) -> int:
    from wbscale.bimt.plots import plot_checkpoint

    out = args.out or str(Path(args.ckpt).resolve().with_name(Path(args.ckpt).name + "-connectivity.png"))
    print(json.dumps(plot_checkpoint(args.ckpt, out, top=args.top), indent=2))
    return 0


def cmd_bimt_toy(args: argparse.Namespace) -> int:
    from wbscale.bimt.toy import run_toy

    recipe = _recipe(args)
    print(json.dumps(run_toy(recipe.bimt, out_dir=args.out), indent=2))
    return 0


def cmd_recipes_list(args: argparse.Namespace) -> int:
    from wbscale.sweep.facts import format_catalog, recipe_catalog

    rows = recipe_catalog()
    print(json.dumps(rows, indent=2) if args.json else format_catalog(rows))
    return 0


def cmd_recipes_show(args: argparse.Namespace) -> int:
    print(_recipe(args).to_yaml(), end="")
    return 0


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from wbscale.slurm.submit import submit

    result = submit(_recipe_source(args), args.overrides, _job_options(args), dry_run=args.dry_run)
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


def cmd_slurm_record_start(args: argparse.Namespace) -> int:
    from wbscale.slurm.record import capture_start

    path = capture_start(Path(args.run_dir))
    print(f"wbscale: environment of this job written to {path}", file=sys.stderr)
    return 0


def cmd_slurm_cancel(args: argparse.Namespace) -> int:
    from wbscale.slurm.status import cancel, resolve_run

    run = resolve_run(args.run, args.runs_dir)
    ids = cancel(run)
    print(f"wbscale: cancelled {', '.join(ids)}" if ids else f"wbscale: no queued or running job for {run}", file=sys.stderr)
    return 0


def cmd_interpret_collect(args: argparse.Namespace) -> int:
    from wbscale.interpret.collect import collect

    manifest = collect(
        args.ckpt, args.out, data_dir=args.data, layers=args.layers, tokens=args.tokens, top_k=args.top_k,
        context=args.context, split=args.split, batch_size=args.batch_size, units=args.units,
        device=_device(args.device), save_every=args.save_every, force=args.force,
    )
    print(args.out if manifest.get("status") == "complete" else json.dumps(manifest))
    return 0


def cmd_interpret_report(args: argparse.Namespace) -> int:
    from wbscale.interpret.report import write_report

    print(write_report(args.dir, args.out, contexts=args.contexts, before=args.context, after=args.after))
    return 0


def cmd_interpret_compare(args: argparse.Namespace) -> int:
    from wbscale.interpret.compare import compare

    result = compare(args.a, args.b, args.out)
    print(result["markdown"], end="")
    print(f"wbscale: wrote {', '.join(result['files'])}", file=sys.stderr)
    return 0


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from wbscale.sweep.grid import SweepSpec, parse_grid, parse_scoped, run_sweep

    plain, scoped = parse_scoped(args.overrides, args.lr)
    fixed, axes = parse_grid(plain, args.arch)
    spec = SweepSpec(_recipe_source(args), fixed, axes, name=args.name, out=args.out, seeds=args.seeds, scoped=scoped)
    slurm = _job_options(args) if args.slurm else None
    result = run_sweep(
        spec, slurm=slurm, dry_run=args.dry_run, progress=False if args.no_progress else None,
        max_concurrent=args.max_concurrent,
    )
    if args.dry_run:
        if result.scripts:
            print("\n".join(result.scripts), end="")
        else:
            for point in result.points:
                print(f"{point['name']}: {' '.join(point['overrides'])}")
        return 0
    for point in result.points:
        extra = f"job {point['job_id']}" if point.get("job_id") else (
            f"val loss {point['val_loss']:.4f}" if point.get("val_loss") is not None else point.get("error", ""))
        print(f"{point['name']}: {point['status']}" + (f" ({extra})" if extra else ""))
    print(f"wbscale: sweep folder {result.out_dir}; plot it with: wbscale sweep report {result.out_dir}", file=sys.stderr)
    if result.failed:
        print(f"wbscale: {len(result.failed)} of {len(result.points)} points failed: {', '.join(result.failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from wbscale.sweep.report import sweep_report

    report = sweep_report(args.dir, args.out)
    for path in report["files"]:
        print(path)
    return 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from wbscale.runs.state import format_table
    from wbscale.sweep.status import sweep_status

    sweep_dir, rows = sweep_status(args.sweep, args.runs_dir)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(f"sweep {sweep_dir}")
        print(format_table(rows))
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    from wbscale.runs.state import format_table, list_runs, matches, parse_filters

    filters = parse_filters(args.filter)
    rows = [r for r in list_runs(args.runs_dir, rebuild=args.rebuild) if matches(r, filters)]
    print(json.dumps([r.to_dict() for r in rows], indent=2) if args.json else format_table(rows))
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from wbscale.runs.state import find_run, format_show, history, list_runs

    name = find_run(args.runs_dir, args.name)
    (row,) = list_runs(args.runs_dir, only=[name])
    events = history(Path(args.runs_dir) / name)
    if args.json:
        print(json.dumps({**row.to_dict(), "history": events}, indent=2, default=str))
    else:
        print(format_show(row, events))
    return 0


def cmd_runs_resubmit(args: argparse.Namespace) -> int:
    from wbscale.runs.heal import actions_json, format_actions, resubmit, watch

    if not args.watch:
        given = [flag for flag, value in (("--interval", args.interval), ("--rounds", args.rounds)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} only apply with --watch (resubmit once: leave {'them' if len(given) > 1 else 'it'} out)")
    if args.watch:
        if args.name:
            raise UserError("--watch heals every --failed / --stale run; leave out NAME")

        def report(actions) -> None:
            print(actions_json(actions) if args.json else format_actions(actions), flush=True)

        watch(
            args.runs_dir, failed=args.failed or not args.stale, stale=args.stale or not args.failed,
            max_retries=args.max_retries, interval=300.0 if args.interval is None else args.interval,
            rounds=args.rounds, dry_run=args.dry_run, report=report,
        )
        return 0
    actions = resubmit(
        args.runs_dir, [args.name] if args.name else None, failed=args.failed, stale=args.stale,
        max_retries=args.max_retries, dry_run=args.dry_run,
    )
    print(actions_json(actions) if args.json else format_actions(actions))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from wbscale.doctor import checks_json, exit_code, format_checks, run_checks

    checks = run_checks(args.runs_dir)
    print(checks_json(checks) if args.json else format_checks(checks))
    return exit_code(checks)


# ---------------------------------------------------------------------------- parser


def _job_parent(array: bool) -> argparse.ArgumentParser:
    """SLURM job options shared by ``slurm submit`` and ``sweep run --slurm``."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("SLURM job options")
    g.add_argument("--nodes", type=int, help="nodes (default: the recipe's distributed.nodes)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (default: distributed.devices)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", metavar="HH:MM:SS", help="time limit; the run checkpoints and requeues before it")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    if array:
        g.add_argument("--array", metavar="INDEXES", help="job array (e.g. 0-3): task i trains run '<run>-i', seed + i")
    g.add_argument("--site", metavar="FILE", help="site settings (default: ~/.config/wbscale/slurm.yaml if present)")
    return p


def _job_options(args: argparse.Namespace):
    from wbscale.slurm.site import JobOptions

    return JobOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, account=args.account,
        time=args.time, qos=args.qos, constraint=args.constraint, array=getattr(args, "array", None),
        site_path=args.site,
    )


class _PrintCompletion(argparse.Action):
    """``--print-completion SHELL``: a completion script from shtab (the optional extra)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            import shtab
        except ImportError:
            from wbscale.errors import extra_requirement

            parser.exit(2, f"wbscale: error: {option_string} needs the 'shtab' package, which is not installed: "
                           f"pip install '{extra_requirement('completion')}'\n")
        print(shtab.complete(parser, shell=values))
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wbscale", description="Train and inspect white-box (CRATE) language models.")
    parser.add_argument("--version", action="version", version=f"wbscale {__version__}")
    parser.add_argument("--print-completion", choices=("bash", "zsh", "tcsh"), action=_PrintCompletion, metavar="SHELL",
                        help="print a shell completion script (bash, zsh, tcsh; needs pip install "
                             "'wbscale[completion]'), e.g. wbscale --print-completion bash > ~/.wbscale-complete.bash")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipe_args, device_args = _recipe_parent(), _device_parent()

    def recipe_verb(group, name: str, required: bool = True, parents=(), **kwargs) -> argparse.ArgumentParser:
        """A verb that runs a recipe: RECIPE (or --config/--recipe) and --set from the shared parent."""
        p = group.add_parser(name, parents=[recipe_args, *parents], **kwargs)
        p.set_defaults(recipe_required=required, verb_parser=p)
        return p

    p = recipe_verb(sub, "fit", required=False, help="train (or resume) the run a recipe describes")
    p.add_argument(
        "--resume", default="auto", metavar="auto|never|PATH",
        help="auto (default): continue from the run's newest checkpoint if any; never: refuse to "
        "reuse a run folder with checkpoints; PATH: a checkpoint folder (its recipe is used if no RECIPE)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = recipe_verb(data, "prepare", help="tokenize the recipe's data source into shards + manifest")
    p.add_argument("--force", action="store_true", help="rebuild even if data.out_dir holds data of another config")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("eval", parents=[device_args], help="validation loss and perplexity of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--data", help="prepared data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--batches", type=_positive_int, default=50, help="validation batches (default 50)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per batch (default 8)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", parents=[device_args], help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many tokens (>= 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (argmax)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0,
        help="nucleus sampling: among the fewest tokens whose probability reaches p (1: off)",
    )
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the context at every step (same text, slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples, with seeds seed, seed + 1, ...")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "metrics", parents=[device_args], help="white-box metrics (sparsity, coding rate, …) of a checkpoint"
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--data", help="prepared data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--out", help="output folder for whitebox.json and PNGs (default: <ckpt>-whitebox next to it)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.set_defaults(func=cmd_metrics)

    interpret = sub.add_parser(
        "interpret", help="white-box inspection: top contexts and token readout of every ISTA atom / MLP neuron"
    ).add_subparsers(dest="interpret_command", required=True)
    p = interpret.add_parser(
        "collect", parents=[device_args],
        help="stream held-out tokens; keep each unit's top-k contexts, frequency, readout",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--data", help="prepared data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--out", required=True, help="output folder (re-running the same command resumes into it)")
    p.add_argument("--layers", help="comma-separated layers, e.g. 0,5,11 (default: all)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to stream (default 1,000,000; capped by the split)")
    p.add_argument("--top-k", type=int, default=20, help="contexts kept per unit (default 20)")
    p.add_argument("--context", type=int, default=16, help="tokens stored each side of an activating token (default 16)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="data split (default: val, held out)")
    p.add_argument("--units", default="auto", choices=["auto", "ista", "mlp"],
                   help="ista: CRATE dictionary atoms; mlp: GPT-2 MLP neurons; auto: by model")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows of block_size tokens per forward pass")
    p.add_argument("--save-every", type=int, default=64, help="batches between state saves (resume points)")
    p.add_argument("--force", action="store_true", help="start over even if --out holds a (partial) collection")
    p.set_defaults(func=cmd_interpret_collect)
    p = interpret.add_parser("report", help="write one self-contained static HTML page of a collection")
    p.add_argument("dir", help="a folder written by `wbscale interpret collect`")
    p.add_argument("--out", help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--contexts", type=int, default=8, help="top contexts shown per unit (default 8)")
    p.add_argument("--context", type=int, default=10, help="tokens shown left of the activating token (default 10)")
    p.add_argument("--after", type=int, default=4, help="tokens shown right of it (default 4)")
    p.set_defaults(func=cmd_interpret_report)
    p = interpret.add_parser("compare", help="two collections side by side (e.g. CRATE vs GPT-2): table + PNG")
    p.add_argument("a", metavar="A", help="collection folder")
    p.add_argument("b", metavar="B", help="collection folder")
    p.add_argument("--out", help="output folder (default: compare-A-vs-B next to A)")
    p.set_defaults(func=cmd_interpret_compare)

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
    p = ckpt.add_parser("consolidate", help="any checkpoint (DDP, ZeRO-1/2/3) -> one export folder for eval/generate")
    p.add_argument("path", help="checkpoint folder or run folder")
    p.add_argument("--out", required=True, help="export folder to write (model.safetensors, recipe.yaml, tokenizer.json)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=cmd_ckpt_consolidate)
    p = ckpt.add_parser(
        "export", help="a run or checkpoint -> a Hugging Face folder (GPT-2: GPT2LMHeadModel; CRATE: trust_remote_code)"
    )
    p.add_argument("path", metavar="RUN_OR_CKPT", help="run folder, checkpoint folder, or export folder")
    p.add_argument("--format", required=True, choices=["hf"], help="hf: a transformers folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="folder to write (written beside it, then renamed into place)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.set_defaults(func=cmd_ckpt_export)

    p = sub.add_parser(
        "evaluate", parents=[device_args], help="lm-evaluation-harness tasks (hellaswag, arc_easy, …) on a checkpoint",
        description="Runs lm-eval tasks on a run, checkpoint or export folder (needs pip install 'wbscale[eval]'); "
        "writes <run>/eval/lm-eval-<time>.json and logs to the run's wandb run when it has one.",
    )
    p.add_argument("path", metavar="RUN_OR_CKPT", help="run folder, checkpoint folder, or export folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. hellaswag,lambada_openai,arc_easy")
    p.add_argument("--batch-size", default="1", help="sequences per forward pass (default 1; auto: 16)")
    p.add_argument("--limit", type=float, help="at most this many examples per task (< 1: a fraction)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--include-path", action="append", metavar="DIR", help="folder of extra task YAMLs (repeatable)")
    p.add_argument("--out", help="JSON file to write (default: <run>/eval/lm-eval-<time>.json)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--no-wandb", action="store_true", help="do not log the results to the run's wandb run")
    p.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser("bench", help="benchmarks: kernels, train, data, bimt, interpret").add_subparsers(
        dest="bench_command", required=True
    )
    p = bench.add_parser(
        "kernels", help="the fused ISTA kernels against eager, torch.compile and the GEMM floor (CPU: correctness only)",
        description="On CUDA: times forward, backward and forward+backward of eager, torch.compile, the fused "
        "Triton kernels and the GEMM floor for every (tokens, d), with peak memory; writes JSON + Markdown. "
        "Without a GPU: a correctness sweep under the Triton interpreter, no timings. Exit status 1 when the "
        "correctness check fails.",
    )
    p.add_argument("--variant", choices=("overcomplete", "square"), default="overcomplete")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--tokens", type=_int_list, default=[4096, 16384, 65536], help="e.g. 4096,16384")
    p.add_argument("--d", type=_int_list, default=[512, 768, 1024, 1600], help="e.g. 512,768")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    p.add_argument("--no-save-activations", action="store_true", help="recompute the codes in backward")
    p.set_defaults(func=cmd_bench_kernels)
    p = recipe_verb(bench, "train", help="training throughput of a recipe (tokens/s, step time, memory, MFU)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps to run (default 20)")
    p.add_argument("--arch", help="comma-separated architectures to run back to back, e.g. crate,gpt2 (same recipe otherwise)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--devices", type=int, help="processes/GPUs per node (sets distributed.devices)")
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.set_defaults(func=cmd_bench_train)
    p = recipe_verb(
        bench, "data", help="`data prepare`'s tokenize pass vs raw tokenizers encode_batch on the recipe's data (JSON)",
        description="Tokens/s of the pass `wbscale data prepare` runs (workers, id arrays, shards, sha256, fsynced "
        "writes) against the tokenizer's own multi-threaded encode_batch over the same in-memory documents; "
        "the two alternate and the best of each counts. Writes nothing under data.out_dir.",
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds, best of each counts (default 3)")
    p.add_argument("--workers", type=int, help="worker processes (default: data.workers; 0: one per CPU core)")
    p.set_defaults(func=cmd_bench_data)
    p = bench.add_parser(
        "bimt", parents=[device_args],
        help="BIMT timings at GPT-2 124M shape (random weights): swap rounds, cost gradient vs a train step (JSON)",
    )
    p.add_argument("--top-k", type=int, default=32, help="swap candidates per neuron (default 32)")
    p.add_argument("--batch", type=int, default=1, help="sequences per train step (default 1)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.set_defaults(func=cmd_bench_bimt)
    from wbscale.bench.gpu import add_arguments as add_gpu_check_arguments

    p = bench.add_parser(
        "gpu", help="the GPU proof in one command (make gpu-check): environment, kernel correctness and speed, "
        "per-GEMM breakdown, training MFU, generation; each stage time-limited, its JSON written as it ends",
    )
    add_gpu_check_arguments(p)
    p.set_defaults(func=cmd_bench_gpu)
    p = bench.add_parser(
        "generate", parents=[device_args],
        help="generate() tokens/s with and without the attention cache, CRATE vs GPT-2 at one shape (JSON)",
    )
    p.add_argument("--arch", default="crate,gpt2", help="comma-separated architectures (default crate,gpt2)")
    p.add_argument("--n-layer", type=_positive_int, default=4)
    p.add_argument("--n-embd", type=_positive_int, default=128)
    p.add_argument("--n-head", type=_positive_int, default=4)
    p.add_argument("--block-size", type=_positive_int, default=128)
    p.add_argument("--vocab-size", type=_positive_int, default=2048)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.set_defaults(func=cmd_bench_generate)
    p = bench.add_parser(
        "interpret", parents=[device_args],
        help="`interpret collect` throughput vs a plain forward over the same tokens (JSON)",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder")
    p.add_argument("--data", help="prepared data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to stream (default 16384)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="best of this many alternating rounds (default 2)")
    p.add_argument("--layers", help="comma-separated layers (default: all)")
    p.set_defaults(func=cmd_bench_interpret)

    bimt = sub.add_parser("bimt", help="brain-inspired modular training: plots, toy").add_subparsers(
        dest="bimt_command", required=True
    )
    p = bimt.add_parser("plot", help="connectivity plot (PNG) + modularity metrics of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint folder, run folder, or export folder (e.g. runs/<run>/bimt-pruned)")
    p.add_argument("--out", help="PNG to write (default: <ckpt>-connectivity.png next to it)")
    p.add_argument("--top", type=int, default=200, help="strongest connections drawn per layer (default 200)")
    p.set_defaults(func=cmd_bimt_plot)
    p = recipe_verb(bimt, "toy", help="BIMT vs plain training of a small MLP (recipes/bimt-toy-*.yaml), CPU")
    p.add_argument("--out", help="output folder (default: the recipe's bimt.toy.out_dir)")
    p.set_defaults(func=cmd_bimt_toy)

    recipes = sub.add_parser("recipes", help="the recipes shipped under recipes/").add_subparsers(
        dest="recipes_command", required=True
    )
    p = recipes.add_parser("list", help="table of recipes: model, parameters, tokens, data, target val loss")
    p.add_argument("--json", action="store_true", help="print the table as JSON (with each target's source)")
    p.set_defaults(func=cmd_recipes_list)
    p = recipe_verb(recipes, "show", help="print a recipe fully resolved")
    p.set_defaults(func=cmd_recipes_show)
    p = recipe_verb(recipes, "check", help="parameters, FLOPs/token and per-GPU memory per ZeRO stage: does it fit?")
    p.add_argument("--nodes", type=int, help="nodes (default: distributed.nodes)")
    p.add_argument("--devices", type=int, help="GPUs per node (default: distributed.devices)")
    p.add_argument("--gpu", default="h100-80gb", help="h100-80gb (default), a100-80gb, a100-40gb, h200-141gb, l40s-48gb, …")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when the recipe's configuration does not fit")
    p.set_defaults(func=cmd_recipes_check)

    sweep = sub.add_parser(
        "sweep", help="train a grid of recipe overrides (CRATE vs GPT-2 scaling) and plot it",
        description="wbscale sweep run RECIPE … trains a grid; wbscale sweep report DIR plots a sweep folder. "
        "`wbscale sweep RECIPE …` is short for `wbscale sweep run RECIPE …`.",
    ).add_subparsers(dest="sweep_command", required=True, metavar="{run,report,status}")
    p = recipe_verb(
        sweep, "run", parents=[_job_parent(array=False)], help="train every combination of the grid, one run each, in runs/sweeps/<name>/",
        description="wbscale sweep run RECIPE --set model.n_layer=2,4 --set model.n_embd=64,128 --arch crate,gpt2 "
        "trains every combination, one run each, in runs/sweeps/<name>/. A --set with two or more "
        "comma-separated values is an axis of the grid; one with a single value applies to every point.",
    )
    p.add_argument("--arch", metavar="A,B", help="shorthand for --set model.arch=A,B (e.g. crate,gpt2)")
    p.add_argument(
        "--seeds", type=int, metavar="N",
        help="train every point N times: train.seed = the recipe's seed + i, runs named <point>-s0 … -s<N-1>",
    )
    p.add_argument(
        "--lr", action="append", default=[], metavar="[ARCH=]V1,V2,…",
        help="learning-rate axis, per architecture with ARCH= (repeatable: --lr crate=1e-3,2e-3 --lr gpt2=5e-4,1e-3); "
        "the same as --set ARCH:optim.max_lr=V1,V2,… (any key can be scoped so). optim.min_lr follows as "
        "max_lr/10 unless set",
    )
    p.add_argument("--name", help="sweep name (default: the recipe's name); runs go to <runs_dir>/sweeps/<name>/")
    p.add_argument("--out", metavar="FOLDER", help="sweep folder (default runs/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="list the points (with --slurm: print the job array's script); run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--slurm", action="store_true", help="submit the grid as ONE SLURM job array, a task per point (job options below)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="with --slurm: at most N tasks of the array at once (SLURM's %%N)")
    p.set_defaults(func=cmd_sweep_run)
    p = sweep.add_parser("report", help="scaling.png, scaling.md and scaling.json of a sweep folder")
    p.add_argument("dir", metavar="DIR", help="the sweep folder, e.g. runs/sweeps/<name>")
    p.add_argument("--out", metavar="FOLDER", help="where the report goes (default DIR)")
    p.set_defaults(func=cmd_sweep_report)
    p = sweep.add_parser("status", help="every point of a sweep: state, step, losses, jobs (the run registry)")
    p.add_argument("sweep", metavar="NAME_OR_DIR", help="a sweep name under <runs-dir>/sweeps/ or a sweep folder")
    p.add_argument("--runs-dir", default="runs", help="where sweep names are looked up (default: runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sweep_status)

    runs = sub.add_parser(
        "runs", help="every run, local or on SLURM: state, step, losses, tokens/s, checkpoint, jobs, wandb",
        description="wbscale runs lists the run registry of a runs folder (one row per run); "
        "`runs show NAME` adds the run's history; `runs resubmit` restarts runs that died.",
    )
    runs.add_argument("--runs-dir", default="runs", help="the runs folder (default: runs)")
    runs.add_argument("--filter", action="append", default=[], metavar="KEY=GLOB[,GLOB]",
                      help="keep rows whose field matches, e.g. state=failed,stale or arch=crate (repeatable)")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.add_argument("--rebuild", action="store_true", help="rebuild the registry from the run folders first")
    runs.set_defaults(func=cmd_runs_list)
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="{list,show,resubmit}")
    sub_dir = dict(default=argparse.SUPPRESS, help="the runs folder (default: runs)")
    p = runs_sub.add_parser("list", help="one row per run (the default)")
    p.add_argument("--runs-dir", **sub_dir)
    p.add_argument("--filter", action="append", default=argparse.SUPPRESS, metavar="KEY=GLOB[,GLOB]")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("--rebuild", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_runs_list)
    p = runs_sub.add_parser("show", help="one run in full, with its history: starts, stops, requeues, resumes")
    p.add_argument("name", metavar="NAME", help="run name, its path under the runs folder, or its folder")
    p.add_argument("--runs-dir", **sub_dir)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_runs_show)
    p = runs_sub.add_parser(
        "resubmit", help="resubmit runs that died without finishing (not on bad input), with --resume auto",
        description="Resubmits failed or stale runs (node failure, OOM-killed, time limit without the signal, "
        "cancelled) with their saved recipe and --resume auto: SLURM runs with the job options of their last "
        "submission, local runs in the background on this host. A run that failed on bad input (exit 2) is never "
        "resubmitted; each run has a retry budget (--max-retries).",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="one run (default: every run --failed / --stale selects)")
    p.add_argument("--failed", action="store_true", help="every failed run")
    p.add_argument("--stale", action="store_true", help="every stale run (recorded running, process or job gone)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N", help="resubmissions per run at most (default 3)")
    p.add_argument("--dry-run", action="store_true", help="say what would be resubmitted; submit nothing")
    p.add_argument("--watch", action="store_true", help="keep healing: repeat every --interval seconds")
    p.add_argument("--interval", type=float, metavar="S", help="with --watch: seconds between rounds (1..3600, default 300)")
    p.add_argument("--rounds", type=int, metavar="N", help="with --watch: stop after N rounds (default: until Ctrl-C)")
    p.add_argument("--runs-dir", **sub_dir)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_runs_resubmit)

    p = sub.add_parser("doctor", help="check this machine: torch/CUDA/GPUs, bf16, NCCL, Triton, DeepSpeed, SLURM, wandb, disk")
    p.add_argument("--runs-dir", default="runs", help="the runs folder whose disk space is checked (default runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    slurm = sub.add_parser("slurm", help="run on a SLURM cluster: submit, status, cancel (record: for job scripts)").add_subparsers(
        dest="slurm_command", required=True
    )
    p = recipe_verb(
        slurm, "submit", parents=[_job_parent(array=True)], help="render the job script for a recipe and sbatch it",
        description="Renders the job script for RECIPE and submits it with sbatch. The --set overrides are "
        "saved with the run, so requeued jobs see them too.",
    )
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
    record = slurm.add_parser(
        "record", help="the run's job record; called by the job scripts `slurm submit` renders"
    ).add_subparsers(dest="record_command", required=True)
    p = record.add_parser(
        "start", help="called by the job script at each job start, not by hand",
        description="Called by the job scripts `wbscale slurm submit` renders, at each start of the job "
        "(first start and every requeue): writes RUN_DIR/slurm/env-<job>-<restart>.json (host, GPUs, "
        "SLURM variables, git commit, versions) and a `start` event to RUN_DIR/slurm_jobs.jsonl.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    p.set_defaults(func=cmd_slurm_record_start)
    return parser


SWEEP_COMMANDS = ("run", "report", "status")


def _expand_aliases(argv: list[str]) -> list[str]:
    """``wbscale sweep RECIPE …`` is the older spelling of ``wbscale sweep run RECIPE …``."""
    if len(argv) >= 2 and argv[0] == "sweep" and argv[1] not in (*SWEEP_COMMANDS, "-h", "--help"):
        return ["sweep", "run", *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_expand_aliases(sys.argv[1:] if argv is None else list(argv)))
    if args.__dict__.get("recipe_required") and not _recipe_source(args):
        args.verb_parser.error("the following arguments are required: RECIPE (a name under recipes/ or a YAML path)")
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
