"""White-box inspection: streaming top-k, atom -> token readout, HTML report in a real browser."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from helpers import tiny_overrides

from wbscale.ckpt.load import export_folder, load_for_inference
from wbscale.config import load_recipe
from wbscale.data.prepare import prepare
from wbscale.errors import UserError
from wbscale.interpret.collect import (
    MANIFEST_FILE,
    StreamingTopK,
    TokenStream,
    collect,
    layer_file,
    token_entropy,
)
from wbscale.interpret.compare import compare
from wbscale.interpret.readout import readout_scores, token_readout, unit_directions
from wbscale.interpret.report import build_payload, write_report
from wbscale.models import build_model

SEQ = 32
TOKENS = 1000  # 31 full windows of 32 + a tail of 8: exercises the short last batch
TOP_K = 5
CONTEXT = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Prepared data + a tiny CRATE and a tiny GPT-2 export folder (random init, seeded)."""
    root = tmp_path_factory.mktemp("interpret")
    recipe = load_recipe("demo", tiny_overrides(root, "tiny"))
    data = prepare(recipe.data, progress=False)
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    out = {"root": root, "data": data}
    for arch in ("crate", "gpt2"):
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(recipe.model, arch=arch, vocab_size=vocab, block_size=SEQ)
        model = build_model(model_cfg)
        out[arch] = export_folder(model, dataclasses.replace(recipe, model=model_cfg), root / arch,
                                  tokenizer_path=data / "tokenizer.json")
    return out


def _collect(tiny, arch: str, out: Path, **kw) -> dict:
    args = dict(data_dir=tiny["data"], tokens=TOKENS, top_k=TOP_K, context=CONTEXT, batch_size=4,
                device="cpu", save_every=2, progress=False)
    return collect(tiny[arch], out, **{**args, **kw})


@pytest.fixture(scope="module")
def collected(tiny) -> dict[str, Path]:
    out = {}
    for arch in ("crate", "gpt2"):
        _collect(tiny, arch, tiny["root"] / f"collect-{arch}")
        out[arch] = tiny["root"] / f"collect-{arch}"
    return out


def _units(path: Path, layer: int) -> list[dict]:
    return [json.loads(line) for line in (path / layer_file(layer)).read_text().splitlines()]


def _brute_force(tiny, arch: str) -> tuple[np.ndarray, list[torch.Tensor]]:
    """All tokens and every layer's full (N, m) activations, via white_box_forward."""
    model, _, _ = load_for_inference(tiny[arch])
    stream = TokenStream(tiny["data"], "val")
    tokens = stream.read(0, TOKENS + CONTEXT)  # right context may run past the collected tokens
    name = "sparse_code" if arch == "crate" else "mlp_activation"
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.config.n_layer)]
    for start in range(0, TOKENS, SEQ):
        idx = torch.from_numpy(tokens[start:min(start + SEQ, TOKENS)])[None]
        for i, acts in enumerate(model.white_box_forward(idx)[name]):
            per_layer[i].append(acts[0])
    return tokens, [torch.cat(a) for a in per_layer]


# ---------------------------------------------------------------------------- streaming top-k


def test_streaming_topk_matches_brute_force_on_random_batches():
    torch.manual_seed(0)
    acts = torch.randn(997, 13)  # distinct values almost surely: positions are unique too
    tracker = StreamingTopK(13, 7)
    start = 0
    for size in (1, 100, 3, 400, 493):
        tracker.update(acts[start:start + size], torch.arange(start, start + size))
        start += size
    values, positions = acts.topk(7, dim=0)
    assert torch.equal(tracker.values, values), (tracker.values - values).abs().max()
    assert torch.equal(tracker.positions, positions)
    assert torch.equal(tracker.active, (acts > 0).sum(0))
    torch.testing.assert_close(tracker.total, acts.double().sum(0), rtol=1e-5, atol=1e-4)  # fp32 within a batch


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_streaming_topk_equals_brute_force_topk(tiny, collected, arch):
    tokens, full = _brute_force(tiny, arch)
    manifest = json.loads((collected[arch] / MANIFEST_FILE).read_text())
    assert manifest["tokens"] == TOKENS and manifest["status"] == "complete"
    for layer, acts in enumerate(full):
        units = _units(collected[arch], layer)
        assert len(units) == acts.size(1)
        values, _ = acts.topk(TOP_K, dim=0)
        for u in units:
            j = u["atom"]
            want = [v for v in values[:, j].tolist() if v > 0]
            got = [c["activation"] for c in u["top"]]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"layer {layer} unit {j}")
            for c in u["top"]:
                p = c["position"]
                # the position is a witness of the value, and the stored window is the stream's
                assert abs(float(acts[p, j]) - c["activation"]) < 1e-5, (layer, j, p)
                lo = max(p // SEQ * SEQ, p - CONTEXT)
                assert c["tokens"] == tokens[lo:p + CONTEXT + 1].tolist()
                assert c["tokens"][c["index"]] == tokens[p]
            np.testing.assert_allclose(u["frequency"], float((acts[:, j] > 0).double().mean()), atol=1e-12)
            np.testing.assert_allclose(u["mean"], float(acts[:, j].double().mean()), rtol=1e-5, atol=1e-7)
            assert u["dead"] == (not bool((acts[:, j] > 0).any()))


def test_resumed_collect_equals_one_shot(tiny, collected, tmp_path):
    out = tmp_path / "resumed"
    first = _collect(tiny, "crate", out, stop_after_chunks=2)
    assert first["status"] == "partial" and first["batches_done"] == 4
    assert not (out / MANIFEST_FILE).exists()
    with pytest.raises(UserError, match="other settings.*top_k"):
        _collect(tiny, "crate", out, top_k=TOP_K + 1)
    _collect(tiny, "crate", out)
    for layer in range(2):
        assert (out / layer_file(layer)).read_bytes() == (collected["crate"] / layer_file(layer)).read_bytes()


# ---------------------------------------------------------------------------- readout


def test_readout_equals_explicit_computation(tiny):
    for arch in ("crate", "gpt2"):
        model, _, _ = load_for_inference(tiny[arch])
        with torch.no_grad():  # give ln_f a non-trivial gain so the test can tell it is used
            model.transformer.ln_f.weight.copy_(torch.linspace(0.5, 1.5, model.config.n_embd))
        wte, gain = model.transformer.wte.weight.detach(), model.transformer.ln_f.weight.detach()
        directions = unit_directions(model, 1, "ista" if arch == "crate" else "mlp")
        promote, suppress = token_readout(model, directions, n=4, chunk=7)
        for j in (0, 5, directions.size(0) - 1):
            # atom j of CRATE writes row j of the dictionary (out = z2 W); GPT-2 neuron j
            # writes column j of c_proj.weight (d x 4d)
            if arch == "crate":
                v = model.transformer.h[1].ista.dictionary[j]
            else:
                v = model.transformer.h[1].mlp.c_proj.weight[:, j]
            v = v.detach().double()
            scores = torch.stack([(wte[t].double() * gain.double() * (v - v.mean())).sum() for t in range(wte.size(0))])
            order = torch.argsort(scores, descending=True)
            assert [i for i, _ in promote[j]] == order[:4].tolist(), (arch, j)
            assert [i for i, _ in suppress[j]] == order.flip(0)[:4].tolist(), (arch, j)
            np.testing.assert_allclose([s for _, s in promote[j]], scores[order[:4]].numpy(), atol=1e-4)
            np.testing.assert_allclose(readout_scores(model, directions[j:j + 1])[0].double(), scores, atol=1e-4)


def test_square_ista_units_write_basis_vectors():
    # square ISTA: the block's output is the code itself, so unit j writes e_j
    from wbscale.config import ModelConfig

    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50,
                                    ista_variant="square"))
    assert torch.equal(unit_directions(model, 0, "ista"), torch.eye(16))
    with pytest.raises(UserError, match="no MLP"):
        unit_directions(model, 0, "mlp")


def test_token_entropy_is_zero_for_one_token_and_grows_with_spread():
    assert token_entropy([7, 7, 7]) == 0.0
    assert token_entropy([1, 2, 1, 2]) == pytest.approx(1.0)
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert token_entropy([]) is None


# ---------------------------------------------------------------------------- report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _chromium(url: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", "--dump-dom", url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _dump_dom(url: str, profile: Path) -> str:
    result = _chromium(url, profile)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split('<script id="wb-data"')[0]  # the rendered DOM, not the page's code


def _rows(dom: str) -> list[int]:
    return [int(a) for a in re.findall(r'<tr class="atom[^"]*" data-atom="(\d+)"', dom)]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium_and_search_filters(collected, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text("<p id=p></p><script>document.getElementById('p').textContent = 'js ran'</script>")
    result = _chromium(probe.as_uri(), tmp_path / "profile")
    if result.returncode != 0 or "js ran" not in result.stdout:  # a browser that cannot start here
        pytest.skip(f"{CHROMIUM} cannot run headless on this machine: {result.stderr[-300:]}")
    report = write_report(collected["crate"], tmp_path / "report.html")
    page = report.read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page, "report must be offline"
    payload = build_payload(collected["crate"])
    layer0 = payload["layers"][0]
    live = [a for a in range(len(layer0["freq"])) if a not in set(layer0["dead"])]

    dom = _dump_dom(report.as_uri(), tmp_path / "profile")
    assert 'data-ready="1"' in dom, "the page script did not finish"
    assert len(re.findall(r"<tr><td>\d+</td>", dom)) == 2, "per-layer summary table"
    assert _rows(dom) == sorted(live, key=lambda a: (-layer0["max"][a], a))[:50]
    assert re.search(f'id="status" data-matched="{len(live)}"', dom)

    # Search: the text of one token, as the page sees it; the page must show exactly the
    # live atoms whose promoted or activating tokens contain it.
    def texts(a: int) -> list[str]:
        ids = layer0["prom"][a] + [i for i, _ in layer0["acttok"][a]]
        return [payload["vocab"][str(i)].lower() for i in ids]

    def matching(q: str) -> list[int]:
        return [a for a in live if any(q in t for t in texts(a))]

    query = next(t for a in live for t in texts(a) if t.strip() and 0 < len(matching(t)) < len(live))
    expected = matching(query)
    # ...and a deep link opens one atom: its contexts render, activating token highlighted.
    atom = expected[0]
    dom = _dump_dom(report.as_uri() + f"#layer=0&atom={atom}&q=" + quote(query), tmp_path / "profile")
    assert re.search(f'id="status" data-matched="{len(expected)}"', dom), (query, expected)
    shown = sorted(expected, key=lambda a: (-layer0["max"][a], a))
    page = shown.index(atom) // 50
    assert _rows(dom) == shown[page * 50:(page + 1) * 50]
    marks = re.findall(r"<mark[^>]*>([^<]*)</mark>", dom)
    top = _units(collected["crate"], 0)[atom]["top"][:8]
    assert marks == [payload["vocab"][str(c["tokens"][c["index"]])].replace("\n", "\u21b5") for c in top]


def test_compare_crate_vs_gpt2_writes_table_and_png(collected, tmp_path, capsys):
    from wbscale.cli import main

    assert main(["interpret", "compare", str(collected["crate"]), str(collected["gpt2"]), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "A: crate" in table and "B: gpt2" in table
    assert len([line for line in table.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]) == 2
    result = json.loads((tmp_path / "compare.json").read_text())
    assert [r["layer"] for r in result["rows"]] == [0, 1, "all"]
    assert (tmp_path / "compare.png").stat().st_size > 1000
    direct = compare(collected["crate"], collected["gpt2"], tmp_path / "again")
    assert direct["rows"] == result["rows"]


# ---------------------------------------------------------------------------- CLI and errors


def test_collect_and_report_cli_write_their_files(tiny, tmp_path, capsys):
    from wbscale.cli import main

    out = tmp_path / "c"
    assert main(["interpret", "collect", "--ckpt", str(tiny["gpt2"]), "--data", str(tiny["data"]), "--layers", "1",
                 "--tokens", "300", "--top-k", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["layers"] == [1] and manifest["units"] == "mlp"
    assert {p.name for p in out.iterdir()} >= {"atoms-layer01.jsonl", "summary.json", "frequency_hist.png", "vocab.json"}
    assert main(["interpret", "report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_bad_inputs_exit_2_with_a_clear_message(tiny, collected, tmp_path, capsys):
    from wbscale.cli import main

    base = ["interpret", "collect", "--data", str(tiny["data"]), "--device", "cpu", "--out", str(tmp_path / "x")]
    assert main([*base, "--ckpt", str(tiny["crate"]), "--layers", "0,2"]) == 2
    assert "layer 2 out of range; the model has 2 layers, numbered 0-1" in capsys.readouterr().err
    assert main([*base, "--ckpt", str(tiny["gpt2"]), "--units", "ista"]) == 2
    assert "no ISTA layers" in capsys.readouterr().err
    assert main([*base, "--ckpt", str(tiny["crate"]), "--layers", "one"]) == 2
    assert "comma-separated layer numbers" in capsys.readouterr().err

    empty = tmp_path / "empty-data"
    shutil.copytree(tiny["data"], empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["val"].update(shards=[], tokens=0, documents=0)
    (empty / "manifest.json").write_text(json.dumps(manifest))
    assert main([*base[:2], "--data", str(empty), "--ckpt", str(tiny["crate"]), "--out", str(tmp_path / "x")]) == 2
    assert "val split of" in capsys.readouterr().err

    assert main(["interpret", "report", str(tmp_path / "nothing")]) == 2
    assert "no finished collection" in capsys.readouterr().err
    assert main(["interpret", "compare", str(collected["crate"]), str(tmp_path / "nothing")]) == 2
    assert "no finished collection" in capsys.readouterr().err
