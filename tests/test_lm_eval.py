"""`wbscale evaluate` through lm-evaluation-harness, offline, on local tasks written here.

The tasks (task YAMLs over jsonl files, loaded with lm-eval's include_path) cover the four
request types: multiple choice and a last-word task (loglikelihood), document perplexity
(loglikelihood_rolling, documents longer than the context window) and generation
(generate_until). wbscale's adapter must give lm-eval's ``hf`` model's numbers on the
exported HF folder, for GPT-2 and (trust_remote_code) CRATE.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from wbscale.ckpt.export_hf import export_hf
from wbscale.ckpt.load import export_folder
from wbscale.cli import main
from wbscale.config import ModelConfig, Recipe
from wbscale.data.bpe import train_bpe

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install 'wbscale[eval]')")
HF_REASON = "lm-eval's hf model needs accelerate (pip install accelerate)"
needs_hf = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason=HF_REASON)

TEXTS = [
    "Once upon a time there was a little cat. The cat liked to play in the sun.",
    "The dog ran to the park and found a red ball. He was very happy.",
] * 40
TASKS = ["wb_mc", "wb_last_word", "wb_ppl", "wb_gen"]


def write_tasks(folder: Path) -> Path:
    """Four lm-eval tasks over jsonl files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    mc = jsonl("mc.jsonl", [
        {"question": f"The {who} ran to the", "choices": ["park", "sun", "red ball", "cat"], "answer": i % 4}
        for i, who in enumerate(["dog", "cat", "bird", "girl", "boy", "fox"])
    ])
    words = jsonl("words.jsonl", [{"text": t} for t in (
        "Once upon a time there was a little cat", "The dog ran to the park", "The cat liked to play in the sun")])
    docs = jsonl("docs.jsonl", [  # the first is ~5 context windows of 32 tokens
        {"page": " ".join(["The dog ran to the park and found a red ball."] * 12)}, {"page": "Once upon a time."}])

    def task(name: str, data: Path, body: str) -> None:
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}"
        )

    task("wb_mc", mc, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
         "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    last_word = """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
"""
    task("wb_last_word", words, last_word + "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
         "    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    task("wb_ppl", docs, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\n'
         "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    task("wb_gen", words, last_word.replace("loglikelihood", "generate_until")
         + 'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n')
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """wbscale export folders of tiny GPT-2 / CRATE models and the HF folders exported from them."""
    root = tmp_path_factory.mktemp("models")
    tok = train_bpe(TEXTS, 300)
    tok.save(str(root / "tokenizer.json"))
    out = {}
    for name, arch, variant in (("gpt2", "gpt2", "overcomplete"), ("crate", "crate", "overcomplete"),
                                ("crate-square", "crate", "square")):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=320, ista_variant=variant)
        from wbscale.models import build_model

        model = build_model(cfg).eval()
        out[name] = export_folder(model, Recipe(model=cfg), root / name, tokenizer_path=root / "tokenizer.json")
        out[f"{name}-hf"] = export_hf(out[name], root / f"{name}-hf")
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def numbers(results: dict) -> dict[str, float]:
    return {f"{task}/{key}": value for task, row in results.items() for key, value in row.items()
            if isinstance(value, float) and "stderr" not in key}


def hf_results(folder: Path, tasks_dir: Path, remote_code: bool = False) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"pretrained={folder}" + (",trust_remote_code=True" if remote_code else "")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=TASKS, device="cpu", batch_size=4, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), log_samples=False,
    )
    return out["results"]


def test_missing_lm_eval_is_one_line_error_naming_the_extra(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["evaluate", str(tmp_path), "--tasks", "hellaswag", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'wbscale[eval]'" in err, err


@needs_lm_eval
@needs_hf
@pytest.mark.slow
def test_gpt2_adapter_matches_lm_evals_hf_model_on_the_export(models, tasks_dir):
    from wbscale.evaluate.harness import evaluate_tasks

    ours = evaluate_tasks(models["gpt2"], TASKS, device="cpu", batch_size=4, include_path=str(tasks_dir),
                          bootstrap_iters=0)
    theirs = hf_results(models["gpt2-hf"], tasks_dir)
    a, b = numbers(ours["results"]), numbers(theirs)
    assert set(a) == set(b) and len(a) == 8, sorted(a)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), f"{key}: wbscale {a[key]} vs hf {b[key]}"
    saved = json.loads(Path(ours["path"]).read_text())
    assert Path(ours["path"]).parent == models["gpt2"] / "eval" and Path(ours["path"]).name.startswith("lm-eval-")
    assert saved["wbscale"]["arch"] == "gpt2" and saved["wbscale"]["tasks"] == TASKS
    assert numbers(saved["results"]) == a
    assert "|wb_mc" in ours["table"]


@needs_lm_eval
@needs_hf
@pytest.mark.slow
def test_crate_adapter_matches_the_remote_code_export(models, tasks_dir):
    from wbscale.evaluate.harness import evaluate_tasks

    ours = evaluate_tasks(models["crate"], TASKS, device="cpu", batch_size=3, include_path=str(tasks_dir),
                          bootstrap_iters=0)
    a, b = numbers(ours["results"]), numbers(hf_results(models["crate-hf"], tasks_dir, remote_code=True))
    assert set(a) == set(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), f"{key}: wbscale {a[key]} vs hf {b[key]}"
    # the registered model name works as any lm-eval model does
    import lm_eval
    from lm_eval.tasks import TaskManager

    import wbscale.evaluate.lm  # noqa: F401 - registers "wbscale"

    by_name = lm_eval.simple_evaluate(
        model="wbscale", model_args=f"pretrained={models['crate']},dtype=float32", tasks=["wb_mc"], device="cpu",
        batch_size=2, bootstrap_iters=0, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
    )
    assert by_name["results"]["wb_mc"]["acc,none"] == a["wb_mc/acc,none"]


def fake_run(root: Path, source: Path, wandb_id: str) -> Path:
    """A run folder holding the source model as a training checkpoint, with a wandb id."""
    from wbscale.ckpt.load import load_for_inference

    model, recipe, _ = load_for_inference(source)
    run = root / "runs" / "crate-run"
    ckpt = run / "checkpoints" / "step-00000006"
    ckpt.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt / "model.ckpt")
    recipe.tracking.wandb.mode = "offline"
    meta = {"step": 6, "recipe": recipe.to_dict(), "data_dir": str(source), "wandb_id": wandb_id}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "last").write_text(ckpt.name)
    (run / "wandb_id.txt").write_text(wandb_id)
    return run


@needs_lm_eval
@pytest.mark.slow
def test_cli_evaluates_a_crate_run_saves_json_and_logs_to_wandb(models, tasks_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = fake_run(tmp_path, models["crate-square"], "wbtest01")
    argv = ["evaluate", str(run), "--tasks", "wb_mc,wb_ppl", "--include-path", str(tasks_dir), "--device", "cpu",
            "--batch-size", "2", "--limit", "4", "--dtype", "bfloat16"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "wb_mc" in out and "word_perplexity" in out
    [saved] = sorted((run / "eval").glob("lm-eval-*.json"))
    assert f"results written to {saved}" in err and "wandb (offline)" in err
    record = json.loads(saved.read_text())
    info = record["wbscale"]
    assert (info["step"], info["arch"], info["ista_variant"], info["dtype"]) == (6, "crate", "square", "bfloat16")
    assert record["results"]["wb_mc"]["acc,none"] >= 0.0
    assert list((run / "wandb").glob("offline-run-*-wbtest01")), "no offline wandb run with the run's id"
    from wbscale.errors import UserError
    from wbscale.evaluate.harness import evaluate_tasks

    with pytest.raises(UserError, match="did you mean 'wb_mc'"):
        evaluate_tasks(run, ["wb_mcc"], include_path=str(tasks_dir), include_defaults=False)
