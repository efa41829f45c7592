"""``wbscale evaluate``: lm-evaluation-harness tasks on a wbscale run, checkpoint or export folder.

The model goes to lm-eval as :class:`wbscale.evaluate.lm.WbscaleLM` (lm-eval model name
``wbscale``), so every lm-eval task works: hellaswag, lambada_openai, arc_easy, … (they
download their data sets from the Hugging Face hub on first use), and local tasks from
``--include-path`` (task YAMLs, e.g. over a jsonl file). The results are saved as JSON::

    <run>/eval/lm-eval-<UTC time>.json      for a run or a checkpoint folder of a run
    <folder>/eval/lm-eval-<UTC time>.json   for an export folder

(the checkpoint, step, tasks, device and dtype under ``"wbscale"``; lm-eval's ``results``,
``configs``, ``versions``, ``n-shot``, … as lm-eval writes them, without per-sample logs),
and logged to the run's wandb run (``lm_eval/<task>/<metric>``, online or offline as the
recipe's ``tracking.wandb.mode`` says) when the run has a wandb id.

lm-eval is an optional extra: ``pip install 'wbscale[eval]'``. It is imported here only
inside :func:`evaluate_tasks`.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from wbscale.ckpt.format import read_checkpoint
from wbscale.ckpt.load import RECIPE_FILE, WEIGHTS_FILE
from wbscale.config import Recipe
from wbscale.errors import UserError, did_you_mean, require
from wbscale.io import atomic_write_text

EVAL_DIR = "eval"


def locate(path: str | Path) -> dict[str, Any]:
    """Where results of ``path`` go and what identifies it: ``{"eval_dir", "run_dir",
    "checkpoint", "step", "wandb_id"}`` (run_dir / step / wandb_id are None for an export folder)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint; pass a run folder, a checkpoint folder or an export folder")
    if (path / WEIGHTS_FILE).is_file() and (path / RECIPE_FILE).is_file():
        return {"eval_dir": path / EVAL_DIR, "run_dir": None, "checkpoint": path, "step": None, "wandb_id": None}
    from wbscale.track.wandb_run import wandb_run_id  # imports lightning: only here

    info = read_checkpoint(path)
    run_dir = info.path.parent.parent if info.path.parent.name == "checkpoints" else info.path.parent
    wandb_id = info.meta.get("wandb_id") or wandb_run_id(run_dir)
    return {"eval_dir": run_dir / EVAL_DIR, "run_dir": run_dir, "checkpoint": info.path, "step": info.step,
            "wandb_id": wandb_id}


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` of lm-eval's ``results`` (filter ``none`` dropped
    from the name, other filters appended as ``<metric>/<filter>``; non-numbers skipped)."""
    flat = {}
    for task, row in results.items():
        for key, value in row.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat


def log_to_wandb(run_dir: Path, run_id: str, recipe: Recipe, metrics: dict[str, float], step: int | None) -> str | None:
    """Log ``metrics`` into the run's wandb run (resumed by id); the mode used, or None if not logged."""
    from wbscale.track.wandb_run import resolve_wandb_mode, server_reachable

    mode, _ = resolve_wandb_mode(recipe.tracking.wandb.mode)
    if mode == "disabled" or importlib.util.find_spec("wandb") is None:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "online" and not server_reachable():
        mode = "offline"
    if mode == "offline":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    cfg = recipe.tracking.wandb

    def init(m: str) -> Any:
        return wandb.init(
            id=run_id, resume="allow", dir=str(run_dir), mode=m, project=cfg.project, entity=cfg.entity,
            reinit="finish_previous", settings=wandb.Settings(silent=True, init_timeout=20.0),
        )

    try:
        run = init(mode)
    except Exception:  # noqa: BLE001 - an online start that fails is retried offline
        if mode != "online":
            raise
        mode = "offline"
        run = init(mode)
    row = dict(metrics)
    if step is not None:
        row["lm_eval/checkpoint_step"] = step
    run.log(row)
    run.summary.update(metrics)
    run.finish()
    return mode


def _check_tasks(task_manager: Any, tasks: list[str]) -> None:
    known = set(task_manager.all_tasks)
    for task in tasks:
        # lm-eval also takes globs and task YAML paths
        if task not in known and not any(c in task for c in "*?[") and not Path(task).exists():
            raise UserError(
                f"--tasks: lm-eval has no task {task!r}{did_you_mean(task, known)} "
                "(`lm-eval ls tasks` lists them; local task YAMLs come in with --include-path)"
            )


def evaluate_tasks(
    path: str | Path,
    tasks: list[str],
    *,
    device: str = "auto",
    batch_size: int | str = 1,
    limit: int | float | None = None,
    dtype: str = "auto",
    num_fewshot: int | None = None,
    include_path: str | Path | list[str | Path] | None = None,
    include_defaults: bool = True,
    out: str | Path | None = None,
    tokenizer: str | Path | None = None,
    wandb_log: bool = True,
    bootstrap_iters: int = 100000,
    seed: int = 1234,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the model at ``path``; save and log the results.

    ``include_path``: folders (or files) of extra task YAMLs; lm-eval's own ~15k task configs
    are indexed (tens of seconds of CPU) only when a task is not found there, or never with
    ``include_defaults=False``.

    Returns ``{"path": the JSON written, "results": lm-eval's results, "table": lm-eval's
    Markdown table, "wandb": the wandb mode logged to or None}``.
    """
    require("lm_eval", "eval", "wbscale evaluate")
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("--tasks: name at least one lm-eval task, e.g. --tasks hellaswag,arc_easy")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from wbscale.ckpt.export_hf import load_any
    from wbscale.evaluate.lm import WbscaleLM, torch_dtype

    where = locate(path)
    torch_dtype(dtype)  # a bad --dtype fails before the model loads
    task_manager = None
    if include_path is not None:  # local tasks only: skip indexing lm-eval's own ~15k configs
        local = TaskManager(include_path=include_path, include_defaults=False)
        if not include_defaults or set(tasks) <= set(local.all_tasks):
            task_manager = local
    if task_manager is None:
        task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    _check_tasks(task_manager, tasks)
    model, recipe, tok = load_any(path, device="cpu", tokenizer=tokenizer)
    lm = WbscaleLM(str(path), model=model, tokenizer=tok, device=device, batch_size=batch_size, dtype=dtype)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=False, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is None:  # only on ranks other than 0, which wbscale does not launch
        raise UserError("lm-eval returned no results")
    results.pop("samples", None)
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "wbscale": {
            "checkpoint": str(where["checkpoint"]),
            "run_dir": str(where["run_dir"]) if where["run_dir"] else None,
            "step": where["step"],
            "arch": model.config.arch,
            "ista_variant": model.config.ista_variant if model.config.arch == "crate" else None,
            "tasks": tasks,
            "device": str(lm.device),
            "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
            "batch_size": lm.batch_size,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "lm_eval_version": importlib.metadata.version("lm_eval"),
            "date": now.isoformat(timespec="seconds"),
        },
        **results,
    }
    target = Path(out) if out else where["eval_dir"] / f"lm-eval-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    atomic_write_text(target, json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
    logged = None
    if wandb_log and where["wandb_id"] and where["run_dir"] is not None:
        logged = log_to_wandb(where["run_dir"], where["wandb_id"], recipe, flat_metrics(results["results"]), where["step"])
    return {"path": str(target), "results": results["results"], "table": make_table(results), "wandb": logged}
