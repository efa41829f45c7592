"""The command-line grammar: one RECIPE argument for every verb that runs a recipe, real
sub-commands for ``sweep`` and ``bench``, ``--device auto`` everywhere, no ``python -m`` side doors.

Parser tests only: nothing here trains or benchmarks anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wbscale import cli

REPO = Path(__file__).resolve().parents[1]

RECIPE_VERBS = [
    ["fit"],
    ["data", "prepare"],
    ["recipes", "show"],
    ["recipes", "check"],
    ["bench", "train"],
    ["bench", "data"],
    ["slurm", "submit"],
    ["bimt", "toy"],
    ["sweep", "run"],
]
VERB_IDS = [" ".join(v) for v in RECIPE_VERBS]


def parse(argv: list[str]):
    return cli.build_parser().parse_args(cli._expand_aliases(argv))


@pytest.mark.parametrize("verb", RECIPE_VERBS, ids=VERB_IDS)
def test_every_recipe_verb_takes_a_positional_recipe_and_the_shared_set(verb):
    args = parse([*verb, "demo", "--set", "train.max_steps=3", "--set", "optim.max_lr=1e-3"])
    assert cli._recipe_source(args) == "demo"
    assert args.overrides == ["train.max_steps=3", "optim.max_lr=1e-3"]
    args = parse([*verb, "--set", "train.max_steps=3", "recipes/demo.yaml"])  # options first
    assert cli._recipe_source(args) == "recipes/demo.yaml"


@pytest.mark.parametrize("verb", RECIPE_VERBS, ids=VERB_IDS)
def test_config_and_recipe_options_are_aliases_of_recipe(verb):
    assert cli._recipe_source(parse([*verb, "--config", "recipes/demo.yaml"])) == "recipes/demo.yaml"
    assert cli._recipe_source(parse([*verb, "--recipe", "demo", "--set", "a.b=1"])) == "demo"


@pytest.mark.parametrize("verb", RECIPE_VERBS, ids=VERB_IDS)
def test_two_recipes_are_refused(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([*verb, "demo", "--config", "recipes/demo.yaml"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [v for v in RECIPE_VERBS if v != ["fit"]], ids=VERB_IDS[1:])
def test_recipe_is_required_except_for_fit(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(verb)
    assert exc.value.code == 2
    assert "RECIPE" in capsys.readouterr().err


def test_fit_without_recipe_parses_for_resume_from_a_checkpoint():
    args = parse(["fit", "--resume", "runs/demo/checkpoints/step-00000010"])
    assert cli._recipe_source(args) is None and args.resume.endswith("step-00000010")
    assert args.func is cli.cmd_fit


def test_one_shared_parent_declares_set():
    source = (REPO / "wbscale" / "cli.py").read_text()
    assert source.count('"--set"') == 1
    assert source.count('"--device"') == 1


def test_sweep_report_and_sweep_run_report_parse():
    args = parse(["sweep", "report", "runs/sweeps/x", "--out", "out"])
    assert args.func is cli.cmd_sweep_report and args.dir == "runs/sweeps/x" and args.out == "out"
    args = parse(["sweep", "run", "report", "--arch", "crate,gpt2"])  # a recipe named `report`
    assert args.func is cli.cmd_sweep_run and cli._recipe_source(args) == "report"
    assert args.arch == "crate,gpt2"


def test_old_sweep_spelling_is_sweep_run():
    assert cli._expand_aliases(["sweep", "demo", "--arch", "a,b"]) == ["sweep", "run", "demo", "--arch", "a,b"]
    assert cli._expand_aliases(["sweep", "--name", "x", "demo"])[:2] == ["sweep", "run"]
    for argv in (["sweep", "report", "d"], ["sweep", "run", "demo"], ["sweep", "-h"], ["sweep"], ["fit", "demo"]):
        assert cli._expand_aliases(argv) == argv
    args = parse(["sweep", "demo", "--set", "model.n_layer=1,2", "--dry-run"])
    assert args.func is cli.cmd_sweep_run and args.overrides == ["model.n_layer=1,2"] and args.dry_run


def test_bench_kernels_help_and_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "kernels", "-h"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--variant", "--dtype", "--tokens", "--d", "--out", "--no-save-activations"):
        assert flag in out
    args = parse(["bench", "kernels", "--tokens", "17,33", "--d", "16", "--dtype", "fp32"])
    assert args.func is cli.cmd_bench_kernels
    assert args.tokens == [17, 33] and args.d == [16] and args.dtype == "fp32" and args.variant == "overcomplete"
    assert args.out == Path("bench/results") and not args.no_save_activations
    with pytest.raises(SystemExit):
        parse(["bench", "kernels", "--tokens", "a,b"])


def test_bench_sub_commands():
    assert parse(["bench", "bimt", "--top-k", "8"]).func is cli.cmd_bench_bimt
    args = parse(["bench", "data", "demo", "--repeats", "1", "--workers", "2"])
    assert args.func is cli.cmd_bench_data and (args.repeats, args.workers) == (1, 2)
    args = parse(["bench", "interpret", "--ckpt", "runs/demo", "--tokens", "64"])
    assert args.func is cli.cmd_bench_interpret and args.tokens == 64 and args.repeats == 2


DEVICE_VERBS = [
    ["eval", "--ckpt", "x"],
    ["generate", "--ckpt", "x"],
    ["metrics", "--ckpt", "x"],
    ["interpret", "collect", "--ckpt", "x", "--out", "y"],
    ["bench", "bimt"],
    ["bench", "interpret", "--ckpt", "x"],
]


@pytest.mark.parametrize("argv", DEVICE_VERBS, ids=[" ".join(a[:2]) for a in DEVICE_VERBS])
def test_device_defaults_to_auto(argv):
    assert parse(argv).device == "auto"
    assert parse([*argv, "--device", "cpu"]).device == "cpu"


def test_auto_device_is_cuda_when_available():
    import torch

    assert cli._device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cli._device("cpu") == "cpu"


def test_a_device_this_machine_lacks_is_refused_naming_it():
    import torch

    from wbscale.errors import UserError

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 7}"
    with pytest.raises(UserError, match=missing):
        cli._device(missing)
    with pytest.raises(UserError, match="not a device"):
        cli._device("gpu-ish")


def test_slurm_record_start_is_a_cli_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["slurm", "record", "start", str(run)]) == 0
    events = [json.loads(line) for line in (run / "slurm_jobs.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start"]
    assert list((run / "slurm").glob("env-*.json"))
    assert "environment of this job written to" in capsys.readouterr().err
    for template in (REPO / "slurm").glob("*.sbatch"):
        text = template.read_text()
        assert "-m wbscale.cli slurm record start {{run_dir}}" in text, template
        assert "wbscale.slurm.record" not in text, template


def test_version(capsys):
    from wbscale import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"wbscale {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


def test_print_completion_for_bash_completes_sub_commands(capsys, tmp_path):
    import shutil
    import subprocess

    pytest.importorskip("shtab")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--print-completion", "bash"])
    assert exit_.value.code == 0
    script = tmp_path / "wbscale.bash"
    script.write_text(capsys.readouterr().out)
    if shutil.which("bash") is None:
        return
    probe = (f"source {script}; COMP_WORDS=(wbscale ckpt con); COMP_CWORD=2; COMP_LINE='wbscale ckpt con'; "
             "COMP_POINT=${#COMP_LINE}; _shtab_wbscale wbscale con ckpt; echo \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["consolidate"], out.stdout + out.stderr


def test_print_completion_without_shtab_names_the_extra(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "shtab", None)  # import shtab raises ImportError
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--print-completion", "zsh"])
    assert exit_.value.code == 2
    assert "pip install 'wbscale[completion]'" in capsys.readouterr().err


def test_no_python_m_side_doors():
    for path in (REPO / "wbscale").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "wbscale":
            continue
        assert not re.search(r"^if __name__ == .__main__.", path.read_text(), re.M), path
    assert not (REPO / "wbscale" / "bimt" / "bench.py").exists()
    assert not (REPO / "wbscale" / "interpret" / "bench.py").exists()
