"""`wbscale ckpt export --format hf`: GPT-2 and CRATE round trips through transformers, and
``data.tokenizer`` as a hub id (wbscale.data.hub).

GPT-2 must load as a plain ``GPT2LMHeadModel``; CRATE through the generated
``modeling_crate.py`` (``trust_remote_code=True``), both with wbscale's logits, generation and
(CRATE) sparse codes. Tiny models and a byte-level BPE trained here; no network.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wbscale.ckpt.export_hf import export_hf
from wbscale.ckpt.load import export_folder, load_for_inference
from wbscale.cli import main
from wbscale.config import ModelConfig, Recipe
from wbscale.data.bpe import train_bpe
from wbscale.errors import UserError
from wbscale.models import build_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "Once upon a time there was a little cat. The cat liked to play in the sun.",
    "The dog ran to the park and found a red ball. He was very happy.",
    "A girl named Lily had a big red ball. She liked to share it with her friends.",
] * 30
PROMPTS = ["Once upon a time the dog", "The cat"]
VARIANTS = {"gpt2": ("gpt2", "overcomplete"), "crate": ("crate", "overcomplete"), "crate-square": ("crate", "square")}


def tiny_model(arch: str, variant: str = "overcomplete", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=320, ista_variant=variant)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One wbscale export folder (model.safetensors + recipe.yaml + tokenizer.json) per model."""
    root = tmp_path_factory.mktemp("sources")
    tok = train_bpe(TEXTS, 300)  # 300 ids; the model's vocabulary is padded to 320
    tok.save(str(root / "tokenizer.json"))
    out = {}
    for name, (arch, variant) in VARIANTS.items():
        model = tiny_model(arch, variant)
        out[name] = export_folder(model, Recipe(model=model.config), root / name, tokenizer_path=root / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory) -> dict[str, Path]:
    """The HF folder of each source, written through the CLI."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, src in sources.items():
        assert main(["ckpt", "export", "--format", "hf", str(src), "--out", str(root / name)]) == 0
        out[name] = root / name
    return out


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text, add_special_tokens=False).ids])


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


# ---------------------------------------------------------------------------- both architectures


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_folder_has_the_hf_files_with_normal_permissions(exported, name):
    folder = exported[name]
    files = {p.name for p in folder.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "README.md"}
    code = {"configuration_crate.py", "modeling_crate.py"}
    assert expected <= files
    assert (code <= files) == name.startswith("crate") and (code & files == set()) == (name == "gpt2")
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"{path.name} is {oct(path.stat().st_mode)}"
    assert not list(folder.parent.glob(f".{name}.tmp*")), "temporary folder left behind"
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 320  # the padded vocabulary, so logits match over every id
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(300, 320))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_loss_match_wbscale(sources, exported, name):
    model, _, tok = load_for_inference(sources[name])
    hf, hf_tok = load_hf(exported[name])
    expected_class = "GPT2LMHeadModel" if name == "gpt2" else "CrateForCausalLM"
    assert type(hf).__name__ == expected_class
    for text in PROMPTS:
        ids = ids_of(tok, text)
        assert hf_tok(text).input_ids == ids[0].tolist()  # the tokenizer files say the same
        with torch.no_grad():
            ours = model(ids)[0]
            theirs = hf(ids).logits
            loss = hf(ids, labels=ids).loss
        assert theirs.shape == ours.shape == (1, ids.size(1), 320)
        diff = (ours - theirs).abs().max().item()
        # CRATE runs the same eager ops (0 on CPU); GPT-2's Conv1D addmm rounds differently.
        assert diff <= (1e-5 if name == "gpt2" else 1e-6), f"{name}: max |logit diff| {diff}"
        assert loss.item() == pytest.approx(model(ids[:, :-1], ids[:, 1:])[1].item(), abs=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_matches_wbscale_greedy_and_left_padded_batches(sources, exported, name):
    model, _, tok = load_for_inference(sources[name])
    hf, hf_tok = load_hf(exported[name])
    ids = ids_of(tok, PROMPTS[0])
    out = hf.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, model.generate(ids, 10, temperature=0))
    batch = hf_tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    both = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, text in zip(both, PROMPTS, strict=True):
        alone = hf.generate(ids_of(tok, text), max_new_tokens=6, do_sample=False)
        assert row[-6:].tolist() == alone[0, -6:].tolist()
    if name != "gpt2":  # CRATE crops the context to block_size, as wbscale does (HF GPT-2 cannot)
        long = hf.generate(ids, max_new_tokens=40, do_sample=False)
        assert long.shape == (1, ids.size(1) + 40)
        assert torch.equal(long, model.generate(ids, 40, temperature=0))


# ---------------------------------------------------------------------------- CRATE specifics


@pytest.mark.parametrize("name", ["crate", "crate-square"])
def test_crate_sparse_codes_are_reachable(sources, exported, name):
    model, _, tok = load_for_inference(sources[name])
    hf, _ = load_hf(exported[name])
    ids = ids_of(tok, PROMPTS[0])
    wb = model.white_box_forward(ids)
    atoms = 128 if name == "crate" else 32
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_sparse_codes=True)
    assert len(out.sparse_codes) == 2 and out.sparse_codes[0].shape == (1, ids.size(1), atoms)
    for layer, (ours, theirs) in enumerate(zip(wb["sparse_code"], out.sparse_codes, strict=True)):
        assert torch.allclose(ours, theirs, atol=1e-6), f"layer {layer}"
    assert len(out.hidden_states) == 3  # embeddings, layer 0, layer 1 (after ln_f)
    assert torch.allclose(out.hidden_states[-1], model.hidden_states(ids), atol=1e-6)
    seen = []
    hook = hf.transformer.h[1].ista.code.register_forward_hook(lambda mod, args, z: seen.append(z))
    with torch.no_grad():
        hf(ids)
    hook.remove()
    assert torch.allclose(seen[0], wb["sparse_code"][1], atol=1e-6)
    assert hf(ids).sparse_codes is None  # off unless asked


@pytest.mark.slow
def test_generated_code_is_self_contained(exported, tmp_path):
    """No wbscale import in the generated files, and the folder loads, offline, in a process
    where wbscale cannot be imported at all."""
    folder = exported["crate"]
    for name in ("configuration_crate.py", "modeling_crate.py"):
        tree = ast.parse((folder / name).read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not any(m.split(".")[0] == "wbscale" for m in modules), f"{name} imports {modules}"
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = load_hf(folder)[0](ids).logits
    script = (
        "import sys, torch; sys.modules['wbscale'] = None\n"  # any wbscale import now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


# ---------------------------------------------------------------------------- the command


def fake_run(root: Path, model, tokenizer: Path, step: int = 4) -> Path:
    """A run folder with one (single-device) training checkpoint, as fit writes it."""
    run = root / "runs" / "r"
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, ckpt / "model.ckpt")
    recipe = Recipe(model=model.config).to_dict()
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "recipe": recipe, "data_dir": str(data), "wandb_id": None}))
    (run / "checkpoints" / "last").write_text(ckpt.name)
    return run


def test_export_from_a_run_folder_and_bf16(sources, tmp_path):
    model, _, _ = load_for_inference(sources["crate"])
    run = fake_run(tmp_path, model, sources["crate"] / "tokenizer.json")
    out = export_hf(run, tmp_path / "hf", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["ista_variant"] == "overcomplete"
    hf, _ = load_hf(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        diff = (hf(ids).logits.float() - model.to(torch.bfloat16)(ids)[0].float()).abs().max().item()
    assert diff == 0.0


def test_sharded_checkpoints_are_consolidated_first(sources, tmp_path, monkeypatch):
    """A DeepSpeed checkpoint (model.ckpt is a folder of shards) goes through consolidate."""
    import wbscale.ckpt.export_hf as export_module

    model, _, _ = load_for_inference(sources["gpt2"])
    run = fake_run(tmp_path, model, sources["gpt2"] / "tokenizer.json")
    ckpt = run / "checkpoints" / "step-00000004"
    (ckpt / "model.ckpt").unlink()
    (ckpt / "model.ckpt").mkdir()  # the shard folder
    calls = []

    def fake_consolidate(path, out):
        calls.append(Path(path))
        return export_folder(model, Recipe(model=model.config), out, tokenizer_path=sources["gpt2"] / "tokenizer.json")

    monkeypatch.setattr(export_module, "consolidate", fake_consolidate)
    out = export_hf(run, tmp_path / "hf")
    assert calls == [ckpt]
    hf, _ = load_hf(out)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5


def test_export_replaces_the_folder_and_refuses_without_tokenizer(sources, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["ckpt", "export", "--format", "hf", str(sources["gpt2"]), "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert capsys.readouterr().out.strip() == str(out)
    bare = tmp_path / "bare"
    model = tiny_model("gpt2")
    export_folder(model, Recipe(model=model.config), bare)  # no tokenizer.json
    assert main(["ckpt", "export", "--format", "hf", str(bare), "--out", str(tmp_path / "x")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="no such checkpoint"):
        export_hf(tmp_path / "missing", tmp_path / "y")


def test_exporting_and_the_cli_do_not_import_transformers():
    code = (
        "import sys, wbscale.cli, wbscale.ckpt.export_hf, wbscale.evaluate.harness, wbscale.data.hub\n"
        "bad = [m for m in ('transformers', 'lm_eval', 'huggingface_hub') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"imported at module level: {proc.stdout.strip()}"


# ---------------------------------------------------------------------------- data.tokenizer: hub ids


def fake_hub_cache(cache: Path, repo: str, payload: str) -> Path:
    """The hub cache layout hf_hub_download reads offline: refs/main -> snapshots/<commit>/file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_text(payload)
    return snap / "tokenizer.json"


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    from wbscale.data.hub import hub_repo, resolve_tokenizer

    assert hub_repo("openai-community/gpt2") == ("openai-community/gpt2", None)
    assert hub_repo("hf:openai-community/gpt2@main") == ("openai-community/gpt2", "main")
    for path in ("tokenizers/gpt2/tokenizer.json", "./gpt2/x", "/abs/tok.json", "~/tok.json", "bpe"):
        assert hub_repo(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_text("{}")
    assert hub_repo("owner/name") is None  # an existing local path wins
    assert resolve_tokenizer("owner/name") == Path("owner/name")
    with pytest.raises(UserError, match="not a hub model id"):
        hub_repo("hf:not a repo")


def test_hub_id_resolves_through_the_cache(offline_hub):
    from wbscale.data.hub import resolve_tokenizer

    tok = train_bpe(TEXTS[:3], 260)
    cached = fake_hub_cache(offline_hub, "wbscale-test/tiny", tok.to_str())
    assert resolve_tokenizer("wbscale-test/tiny") == cached
    assert resolve_tokenizer("hf:wbscale-test/tiny") == cached


def test_hub_id_offline_without_cache_is_one_clear_error(offline_hub):
    from wbscale.data.hub import resolve_tokenizer

    with pytest.raises(UserError) as err:
        resolve_tokenizer("openai-community/gpt2")
    message = str(err.value)
    assert "\n" not in message
    assert "hf download openai-community/gpt2 tokenizer.json --local-dir tokenizers/gpt2" in message
