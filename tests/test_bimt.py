"""BIMT: swaps preserve the function and the optimizer's trajectory, the closed-form costs
match recomputation, rounds never raise the cost, the toy shows modules, and fine-tuning a
(tiny, random) Hugging Face GPT-2 with the callback resumes exactly."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_train_losses, losses, tiny_overrides

from wbscale.bimt.cost import add_cost_gradient, cost_value, lambda_at, modularity_metrics
from wbscale.bimt.geometry import lm_geometry
from wbscale.bimt.prune import count_above, prune_
from wbscale.bimt.swaps import (
    apply_permutation,
    decide_swaps,
    exact_group_cost,
    unit_costs,
)
from wbscale.bimt.toy import ToyMLP, mlp_geometry
from wbscale.config import BIMTPhase, ModelConfig, load_recipe
from wbscale.errors import UserError
from wbscale.models import MODEL_CLASSES

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [("gpt2", "overcomplete"), ("crate", "overcomplete"), ("crate", "square")]
ALL_MAPS = ["hidden", "attention", "embeddings"]


def make_lm(arch: str, variant: str = "overcomplete", dtype=torch.float64, seed: int = 0):
    """A tiny LM with non-trivial biases/norms, so every permuted tensor matters."""
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50,
                      ista_kernel="eager", ista_variant=variant)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(seed: int = 1, b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def cases():
    for arch, variant in VARIANTS:
        model = make_lm(arch, variant)
        for group in lm_geometry(model, maps=ALL_MAPS).swappable():
            yield pytest.param(arch, variant, group.name, id=f"{arch}-{variant}-{group.name}")


# ---------------------------------------------------------------------------- function preserved


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("arch,variant,group", list(cases()))
def test_swap_leaves_logits_unchanged(arch, variant, group, dtype, atol):
    model = make_lm(arch, variant, dtype).eval()
    geom = lm_geometry(model, maps=ALL_MAPS)
    idx = tokens()
    before = model(idx)[0]
    perm = torch.randperm(geom.groups[group].units, generator=torch.Generator().manual_seed(3))
    if torch.equal(perm, torch.arange(perm.numel())):
        perm = perm.flip(0)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_permutation(model, geom, group, perm)
    after = model(idx)[0]
    err = max_diff(after, before)
    assert err <= atol, f"{group}: logits moved by {err:.3e} > {atol:.0e} after a swap"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert changed, f"{group}: the permutation changed no tensor"


def test_toy_mlp_swaps_inputs_hidden_and_outputs_without_changing_outputs():
    torch.manual_seed(0)
    model = ToyMLP([4, 6, 5, 2]).double()
    geom = mlp_geometry(model)
    x = torch.randn(7, 4, dtype=torch.float64)
    before = model(x)
    for name, group in geom.groups.items():
        apply_permutation(model, geom, name, torch.randperm(group.units))
        assert max_diff(model(x), before) < 1e-14, name
    assert torch.equal(torch.sort(model.in_perm).values, torch.arange(4))


@pytest.mark.parametrize("arch,variant", VARIANTS, ids=[f"{a}-{v}" for a, v in VARIANTS])
def test_step_after_swap_equals_swap_after_step(arch, variant):
    """AdamW moments (and gradients) follow the weights: swapping then stepping is stepping
    then swapping, for every unit type at once."""
    model = make_lm(arch, variant)
    geom = lm_geometry(model, maps=ALL_MAPS)
    opt = torch.optim.AdamW(model.configure_param_groups(0.1), lr=1e-2, foreach=False)
    idx, tgt = tokens(1), tokens(2)
    for _ in range(3):  # non-zero moments
        opt.zero_grad()
        model(idx, tgt)[1].backward()
        opt.step()
    perms = {g.name: torch.randperm(g.units, generator=torch.Generator().manual_seed(i))
             for i, g in enumerate(geom.swappable())}

    def clone(m, o):
        m2 = copy.deepcopy(m)
        o2 = torch.optim.AdamW(m2.configure_param_groups(0.1), lr=1e-2, foreach=False)
        o2.load_state_dict(copy.deepcopy(o.state_dict()))  # load_state_dict shares tensors
        return m2, o2

    def step(m, o, seed):
        o.zero_grad()
        m(tokens(seed), tokens(seed + 10))[1].backward()
        o.step()

    def swap(m, o):
        for name, perm in perms.items():
            apply_permutation(m, geom, name, perm, o)

    m1, o1 = clone(model, opt)  # swap, then two steps
    swap(m1, o1)
    step(m1, o1, 5)
    step(m1, o1, 6)
    m2, o2 = clone(model, opt)  # two steps, then swap
    step(m2, o2, 5)
    step(m2, o2, 6)
    swap(m2, o2)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert max_diff(p1, p2) < 1e-12, f"{name}: weights differ by {max_diff(p1, p2):.2e}"
        for key in ("exp_avg", "exp_avg_sq"):
            s1, s2 = o1.state[p1][key], o2.state[p2][key]
            assert max_diff(s1, s2) < 1e-12, f"{name}.{key} differs by {max_diff(s1, s2):.2e}"
    assert max_diff(m1(idx)[0], m2(idx)[0]) < 1e-12


# ---------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("arch,variant", VARIANTS[:2], ids=[f"{a}-{v}" for a, v in VARIANTS[:2]])
def test_closed_form_swap_delta_equals_recomputed_cost_difference(arch, variant):
    model = make_lm(arch, variant)
    geom = lm_geometry(model, maps=ALL_MAPS, locality=2.0, layer_distance=0.3)
    for group in geom.swappable():
        U = group.units
        rows, cols, diag = unit_costs(model, geom, group.name, torch.arange(U))
        base = exact_group_cost(model, geom, group.name)
        pairs = list(itertools.combinations(range(U), 2))[::max(1, U * (U - 1) // 2 // 60)]
        for i, j in pairs:
            perm = torch.arange(U)
            perm[i], perm[j] = j, i
            exact = exact_group_cost(model, geom, group.name, perm) - base
            closed = float(rows[i, j] + cols[j, i] - diag[i] - diag[j])
            assert abs(exact - closed) < 1e-10 * max(1.0, abs(base)), (
                f"{group.name} swap ({i}, {j}): closed form {closed!r} vs recomputed {exact!r}"
            )


@pytest.mark.parametrize("arch,variant", VARIANTS, ids=[f"{a}-{v}" for a, v in VARIANTS])
def test_cost_never_increases_across_swap_rounds(arch, variant):
    model = make_lm(arch, variant)
    geom = lm_geometry(model, maps=ALL_MAPS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accepted = 0
    for _ in range(3):
        for group in geom.swappable():
            before = float(cost_value(model, geom).detach())
            decision = decide_swaps(model, geom, group.name, top_k=4)
            apply_permutation(model, geom, group.name, decision.perm, opt)
            after = float(cost_value(model, geom).detach())
            assert after <= before + 1e-12 * before, f"{group.name}: cost rose {before!r} -> {after!r}"
            assert abs((after - before) - decision.delta) < 1e-9 * before, (
                f"{group.name}: predicted change {decision.delta!r}, actual {after - before!r}"
            )
            accepted += decision.accepted
    assert accepted > 0, "no swap was ever accepted: the test checks nothing"


def test_cost_gradient_is_the_gradient_of_the_cost():
    model = make_lm("gpt2")
    geom = lm_geometry(model, maps=ALL_MAPS, locality=1.5, layer_distance=0.2, reduction="mean", bias_penalty=True)
    model.zero_grad()
    (0.7 * cost_value(model, geom)).backward()
    auto = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    add_cost_gradient(model, geom, 0.7)
    for name, p in model.named_parameters():
        want = auto.get(name, torch.zeros_like(p))
        assert max_diff(p.grad, want) < 1e-15, f"{name}: closed-form gradient differs from autograd"


def test_lambda_schedule_is_piecewise_constant_in_fractions_of_the_run():
    phases = [BIMTPhase(0.0, 1e-3), BIMTPhase(0.25, 1e-2), BIMTPhase(0.75, 1e-3)]
    assert [lambda_at(phases, s, 100) for s in (0, 24, 25, 74, 75, 99)] == [1e-3, 1e-3, 1e-2, 1e-2, 1e-3, 1e-3]
    assert lambda_at([BIMTPhase(0.5, 1.0)], 10, 100) == 0.0


def test_prune_counts_and_metrics():
    torch.manual_seed(0)
    model = ToyMLP([2, 4, 2]).double()
    geom = mlp_geometry(model)
    with torch.no_grad():
        model.linears[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.001, 0.0], [0.0, -0.5]]))
    metrics = modularity_metrics(model, geom, threshold=0.01, radius=0.3, prefix="")
    above = count_above(model, geom, 0.01)
    counts = prune_(model, geom, 0.01)
    assert counts["kept"] == above and counts["total"] == 16
    assert model.linears[0].weight[2, 0] == 0.0 and model.linears[0].weight[3, 1] == -0.5
    assert 0.0 < metrics["mass_within_radius"] <= 1.0


def test_bimt_config_validation():
    base = ["bimt.enabled=true"]
    with pytest.raises(UserError, match="increasing start order"):
        load_recipe("demo", base + ["bimt.lambda_phases=[{start: 0.5, lam: 1}, {start: 0.1, lam: 2}]"])
    with pytest.raises(UserError, match="heads would never move"):
        load_recipe("demo", base + ["bimt.maps=[hidden]", "bimt.units=[heads]"])
    with pytest.raises(UserError, match="bimt.swap_top_k"):
        load_recipe("demo", base + ["bimt.swap_top_k=0"])
    with pytest.raises(UserError, match="did you mean 'bimt.locality'"):
        load_recipe("demo", base + ["bimt.localty=1"])


def test_replica_fingerprint_sees_a_swap():
    """The cross-rank check after a round must notice a rank that did not apply it."""
    from wbscale.bimt.callback import _fingerprint

    model = make_lm("gpt2")
    geom = lm_geometry(model)
    before = _fingerprint(model, geom)
    for group in ("residual", "hidden.1", "heads.0"):
        n = geom.groups[group].units
        apply_permutation(model, geom, group, torch.arange(n).flip(0))
        after = _fingerprint(model, geom)
        assert after != before, f"a swap of {group} left the fingerprint unchanged"
        before = after


# ---------------------------------------------------------------------------- toy


def test_toy_bimt_needs_5x_fewer_connections_at_similar_accuracy(tmp_path, capsys):
    from wbscale.cli import main

    assert main(["bimt", "toy", "bimt-toy-moons", "--out", str(tmp_path), "--set", "bimt.toy.steps=2000"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bimt, plain = summary["bimt"], summary["plain"]
    ratio = plain["connections_above_threshold"] / max(1, bimt["connections_above_threshold"])
    acc_b, acc_p = bimt["test_after_prune"]["accuracy"], plain["test_after_prune"]["accuracy"]
    print(f"toy two-moons: {bimt['connections_above_threshold']} vs {plain['connections_above_threshold']} "
          f"connections ({ratio:.1f}x), test accuracy {acc_b:.3f} vs {acc_p:.3f}", file=sys.stderr)
    assert ratio >= 5, f"only {ratio:.1f}x fewer connections than plain training"
    assert acc_b >= acc_p - 0.02, f"BIMT accuracy {acc_b} vs plain {acc_p}"
    assert (tmp_path / "connectivity.png").stat().st_size > 10_000
    assert (tmp_path / "toy.json").is_file()


# ---------------------------------------------------------------------------- fine-tuning HF GPT-2


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT-2 saved by transformers (the format of a hub checkpoint)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=320, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bimt_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bimt")


def bimt_overrides(root: Path, hf: Path, run: str, **extra) -> list[str]:
    values = {
        "model.arch": "gpt2",
        "model.pretrained": str(hf),
        "model.vocab_size": 320,
        "bimt.enabled": True,
        "bimt.swap_every": 2,
        "bimt.swap_top_k": 8,
        "bimt.metrics_every": 2,
        "bimt.lambda_phases": "[{start: 0, lam: 1.0e-3}, {start: 0.5, lam: 1.0e-2}]",
        "optim.weight_decay": 0.0,
        "tracking.metrics_every": 0,
        **extra,
    }
    return tiny_overrides(root, run, **values)


def final_checkpoint(run_dir: Path) -> dict:
    from wbscale.ckpt.format import latest_checkpoint

    return torch.load(latest_checkpoint(run_dir).model_path, map_location="cpu", weights_only=False)


def test_bimt_finetune_of_hf_gpt2_resumes_exactly(hf_gpt2, bimt_data, capsys):
    from wbscale.train.fit import fit

    full = fit(load_recipe("demo", bimt_overrides(bimt_data, hf_gpt2, "full")), progress=False)
    part = load_recipe("demo", bimt_overrides(bimt_data, hf_gpt2, "parts", **{"train.exit_interval": 4}))
    assert fit(part, progress=False).step == 4
    second = fit(part, resume="auto", progress=False)
    assert second.resumed_from == 4 and second.step == 8
    a, b = losses(full.run_dir), losses(second.run_dir)
    assert_same_train_losses(a, b, range(1, 9))
    swaps = {s: a[s]["bimt/swaps_accepted"] for s in a if "bimt/swaps_accepted" in a[s]}
    assert sorted(swaps) == [2, 4, 6] and sum(swaps.values()) > 0, swaps
    assert {s: b[s]["bimt/swaps_accepted"] for s in b if "bimt/swaps_accepted" in b[s]} == swaps
    ca, cb = final_checkpoint(full.run_dir), final_checkpoint(second.run_dir)
    sa, sb = ca["callbacks"]["BIMTCallback"], cb["callbacks"]["BIMTCallback"]
    assert sa["round"] == sb["round"] == 3 and sa["last_swap_step"] == sb["last_swap_step"] == 6
    for name, perm in sa["permutations"].items():
        assert torch.equal(perm, sb["permutations"][name]), f"{name}: swap state differs after resume"
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in sa["permutations"].values())
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), f"{key}: weights differ after resume"
    assert_export_follows_swaps(full.run_dir, hf_gpt2)
    report = json.loads((full.run_dir / "bimt.json").read_text())
    assert report["connections_kept"] <= report["connections_total"]
    assert report["val_loss_before_prune"] > 0 and report["val_loss_after_prune"] > 0
    assert a[8]["bimt/prune/val_loss_before"] == report["val_loss_before_prune"]
    assert "bimt/connection_cost/layer0" in a[2] and "bimt/mass_within_radius" in a[2]


def test_bimt_plot_of_the_pruned_export(hf_gpt2, bimt_data, capsys):
    from wbscale.ckpt.load import load_for_inference
    from wbscale.cli import main

    export = bimt_data / "runs" / "full" / "bimt-pruned"
    if not export.is_dir():
        pytest.skip("needs test_bimt_finetune_of_hf_gpt2_resumes_exactly")
    model, recipe, tok = load_for_inference(export)
    assert recipe.model.pretrained is None and tok is not None
    out = bimt_data / "plot.png"
    assert main(["bimt", "plot", "--ckpt", str(export), "--out", str(out), "--top", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert out.stat().st_size > 10_000
    assert result["bimt/connections_above_threshold"] == json.loads(
        (bimt_data / "runs" / "full" / "bimt.json").read_text())["connections_kept"]


def test_bimt_crate_recipe_starts_from_a_checkpoint(bimt_data):
    """bimt.init_from: the CRATE run's weights are loaded, then fine-tuned with BIMT."""
    from wbscale.ckpt.load import load_for_inference
    from wbscale.train.fit import fit

    base = fit(load_recipe("demo", tiny_overrides(bimt_data, "crate-base", **{"train.max_steps": 2})), progress=False)
    recipe = load_recipe("bimt-crate", tiny_overrides(bimt_data, "bimt-crate", **{
        "bimt.init_from": str(base.run_dir), "train.max_steps": 2, "bimt.swap_every": 1, "bimt.metrics_every": 1,
        "model.ista_kernel": "eager",
    }))
    result = fit(recipe, progress=False)
    assert result.step == 2
    start, _, _ = load_for_inference(base.run_dir)
    rows = losses(result.run_dir)
    first_loss = rows[1]["train/loss"]
    fresh = fit(load_recipe("bimt-crate", tiny_overrides(bimt_data, "bimt-crate-fresh", **{
        "train.max_steps": 1, "bimt.swap_every": 1, "model.ista_kernel": "eager", "bimt.init_from": "null"})),
        progress=False)
    assert losses(fresh.run_dir)[1]["train/loss"] != first_loss, "init_from had no effect"
    assert start is not None and (result.run_dir / "bimt.json").is_file()


# ---------------------------------------------------------------------------- distributed


def _fit_subprocess(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-m", "wbscale.cli", "fit", "--recipe", "demo", "--no-progress", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bimt_ddp_and_zero2_on_two_cpu_processes_agree(hf_gpt2, bimt_data):
    """Swaps decided on rank 0 and applied on both ranks (the callback checks after every
    round that the ranks still hold the same weights). DDP adds the cost gradient after the
    all-reduce, ZeRO-2 through gradient hooks and permutes its partitioned fp32 master
    weights and moments: both must train the same network."""
    rows = {}
    for strategy in ("ddp", "deepspeed"):
        run = f"dist-{strategy}"
        extra = {"distributed.strategy": strategy, "distributed.devices": 2, "distributed.accelerator": "cpu",
                 "distributed.zero_stage": 2, "tracking.wandb.mode": "disabled", "train.sample_max_new_tokens": 0}
        sets = [x for kv in bimt_overrides(bimt_data, hf_gpt2, run, **extra) for x in ("--set", kv)]
        proc = _fit_subprocess(sets)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows[strategy] = losses(bimt_data / "runs" / run)
        assert sum(r.get("bimt/swaps_accepted", 0) for r in rows[strategy].values()) > 0, strategy
        assert_export_follows_swaps(bimt_data / "runs" / run, hf_gpt2)
    ddp, zero = rows["ddp"], rows["deepspeed"]
    for step in range(1, 9):
        for key in ("train/loss", "bimt/connection_cost", "bimt/swaps_accepted"):
            if key in ddp[step]:
                a, b = ddp[step][key], zero[step][key]
                assert abs(a - b) <= 1e-5 * abs(a), f"step {step} {key}: DDP {a!r} vs ZeRO-2 {b!r}"


def assert_export_follows_swaps(run_dir: Path, hf: Path) -> None:
    """The final weights are the pretrained ones moved by the recorded permutations (plus a
    few small steps): the optimizer's master weights and moments moved with the swaps too,
    or the next step would have written the unswapped layout back."""
    from wbscale.ckpt.load import load_for_inference
    from wbscale.models import GPT2

    final, _, _ = load_for_inference(run_dir / "bimt-pruned")
    start, _ = GPT2.from_pretrained(str(hf))
    perms = {k: torch.tensor(v) for k, v in json.loads((run_dir / "bimt-permutations.json").read_text()).items()}
    hidden, resid = perms["hidden.0"], perms["residual"]
    assert not torch.equal(hidden, torch.arange(hidden.numel())), "no hidden unit of layer 0 moved"
    w = final.get_parameter("transformer.h.0.mlp.c_fc.weight").detach()
    w0 = start.get_parameter("transformer.h.0.mlp.c_fc.weight").detach()
    kept = (w != 0) & (hidden != torch.arange(hidden.numel()))[:, None]  # moved rows; pruned entries say nothing
    moved = (w - w0[hidden][:, resid]).abs()[kept].mean().item()
    unmoved = (w - w0).abs()[kept].mean().item()
    assert moved < 0.25 * unmoved, f"final weights match the swapped layout by {moved:.4f}, the unswapped by {unmoved:.4f}"
