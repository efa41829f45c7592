"""Run tracking: white-box metrics, metrics.jsonl, plots, wandb offline/online/resume."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wbscale.config import Recipe
from wbscale.track.jsonl_logger import JSONLLogger, read_metrics
from wbscale.track.plots import plot_loss_curves, plot_run, plot_whitebox
from wbscale.track.whitebox import (
    activation_sparsity,
    coding_rate,
    compression_gain,
    dead_atoms,
    find_head_projection,
    head_coherence,
    sparsity,
    split_heads,
    whitebox_metrics,
)

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- a tiny CRATE


class TinyCRATE(nn.Module):
    """The CRATE LM layer (docs/architecture.md) at toy size, with the white_box_forward contract."""

    def __init__(self, vocab: int = 48, d: int = 16, n_head: int = 2, n_layer: int = 2, block: int = 32):
        super().__init__()
        self.config = SimpleNamespace(arch="crate", n_layer=n_layer, n_head=n_head, n_embd=d, block_size=block)
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_layer))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_layer))
        self.U = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_layer))
        self.c_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layer))
        self.dictionary = nn.ParameterList(nn.Parameter(torch.randn(4 * d, d) / math.sqrt(d)) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.eta, self.lam = 0.1, 0.1

    def white_box_forward(self, idx: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        B, T = idx.shape
        nh = self.config.n_head
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("sparse_code", "head_projections", "mssa_input", "mssa_output")}
        for i in range(self.config.n_layer):
            X = self.ln1[i](x)
            w = split_heads(self.U[i](X), nh)  # (B, H, T, p)
            att = F.scaled_dot_product_attention(w, w, w, is_causal=True)
            x = x + self.c_proj[i](att.transpose(1, 2).reshape(B, T, -1))
            out["mssa_input"].append(X)
            out["head_projections"].append(w)
            out["mssa_output"].append(x)
            W = self.dictionary[i]
            h = self.ln2[i](x)
            z1 = F.relu(self.eta * h @ W.T - self.eta * self.lam)
            z2 = F.relu(z1 + self.eta * (h - z1 @ W) @ W.T - self.eta * self.lam)
            out["sparse_code"].append(z2)
            x = z2 @ W
        out["logits"] = [self.ln_f(x) @ self.wte.weight.T]
        return out

    def forward(self, idx, targets=None):
        logits = self.white_box_forward(idx)["logits"][0]
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None):
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[0][:, -1] / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, -1), 1)
            idx = torch.cat([idx, nxt], 1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return idx


# ----------------------------------------------------------------------------- white-box math


def _np_coding_rate(Z: np.ndarray, eps: float) -> float:
    """Direct reference: the T x T form of the CRATE code, per (sequence, head)."""
    B, H, T, p = Z.shape
    Z = Z / np.linalg.norm(Z, axis=-1, keepdims=True)
    total = 0.0
    for b in range(B):
        for h in range(H):
            _, logdet = np.linalg.slogdet(np.eye(T) + p / (T * eps) * Z[b, h] @ Z[b, h].T)
            total += 0.5 * logdet
    return total / B


@pytest.mark.parametrize("shape", [(2, 3, 10, 4), (2, 2, 3, 8)])  # T > p and T < p
def test_coding_rate_matches_numpy_reference(shape):
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(*shape, generator=g)
    ours = coding_rate(Z, eps=0.01)
    ref = _np_coding_rate(Z.double().numpy(), 0.01)
    assert ours == pytest.approx(ref, rel=1e-10), (ours, ref)
    # one sequence (H, T, p) sums heads; one head (T, p) is that head alone
    assert coding_rate(Z[0]) == pytest.approx(_np_coding_rate(Z[:1].double().numpy(), 0.01), rel=1e-10)
    assert coding_rate(Z[0, 0]) == pytest.approx(_np_coding_rate(Z[:1, :1].double().numpy(), 0.01), rel=1e-10)


def test_orthogonal_tokens_have_higher_coding_rate_than_repeated_ones():
    p = 8
    orthogonal = torch.eye(p)  # p tokens, pairwise orthogonal
    repeated = torch.ones(p, p)  # p copies of one direction
    r_orth, r_rep = coding_rate(orthogonal), coding_rate(repeated)
    assert r_orth > r_rep
    assert r_orth == pytest.approx(p / 2 * math.log(1 + 1 / 0.01), rel=1e-12)  # closed forms
    assert r_rep == pytest.approx(0.5 * math.log(1 + p / 0.01), rel=1e-12)


def test_sparsity_and_dead_atoms():
    g = torch.Generator().manual_seed(1)
    z = F.relu(torch.randn(3, 5, 7, generator=g))
    z[..., 2] = 0
    z[..., 5] = 0
    ref = float((z.numpy() == 0).mean())
    assert sparsity(z) == pytest.approx(ref, abs=1e-15)
    assert sparsity(torch.zeros(4, 6)) == 1.0
    assert sparsity(torch.ones(4, 6)) == 0.0
    assert dead_atoms(z) == 2
    assert dead_atoms(torch.zeros(2, 3, 9)) == 9
    a = torch.tensor([[-0.1, 0.0, 0.3, 2.0]])
    assert activation_sparsity(a) == 0.5


def test_compression_gain_uses_the_same_projection():
    g = torch.Generator().manual_seed(2)
    B, T, d, H = 3, 20, 8, 2
    x, y, U = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g), torch.randn(d, d, generator=g)
    before, after = split_heads(x @ U, H), split_heads(y @ U, H)
    assert compression_gain(before, after) == pytest.approx(coding_rate(before) - coding_rate(after))
    lin = nn.Linear(d, d, bias=False)
    holder = nn.ModuleList([nn.Linear(d, d), lin])
    found = find_head_projection(holder, x, split_heads(lin(x), H))
    assert found is not None and torch.equal(found, lin.weight.T)
    assert find_head_projection(holder, x, before) is None  # U is not a parameter there
    # orthogonal heads read 0, identical heads read 1
    Q = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    assert head_coherence(Q, H) == pytest.approx(0.0, abs=1e-12)
    assert head_coherence(torch.cat([Q[:, :4], Q[:, :4]], 1), H) == pytest.approx(1.0)


def test_whitebox_metrics_on_tiny_crate_restores_train_mode():
    torch.manual_seed(0)
    model = TinyCRATE().train()
    idx = torch.randint(0, 48, (2, 16))
    m = whitebox_metrics(model, idx)
    assert model.training
    out = model.white_box_forward(idx)
    for i in range(2):
        assert m[f"whitebox/layer{i}/sparsity"] == pytest.approx(sparsity(out["sparse_code"][i]))
        assert m[f"whitebox/layer{i}/coding_rate"] == pytest.approx(coding_rate(out["head_projections"][i]))
        U = model.U[i].weight.T.detach()
        after = split_heads(out["mssa_output"][i].detach() @ U, 2)
        want = coding_rate(out["head_projections"][i]) - coding_rate(after)
        assert m[f"whitebox/layer{i}/compression_gain"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert m[f"whitebox/layer{i}/dead_atoms"] == dead_atoms(out["sparse_code"][i])
        assert 0.0 <= m[f"whitebox/layer{i}/head_coherence"] <= 1.0
    assert m["whitebox/mean/sparsity"] == pytest.approx(
        (m["whitebox/layer0/sparsity"] + m["whitebox/layer1/sparsity"]) / 2
    )


def test_whitebox_metrics_on_real_models_when_available():
    crate = pytest.importorskip("wbscale.models.crate")
    from wbscale.config import ModelConfig

    cfg = ModelConfig(arch="crate", n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=40, ista_kernel="eager")
    model = crate.CRATE(cfg)
    m = whitebox_metrics(model, torch.randint(0, 40, (2, 16)))
    for key in ("sparsity", "coding_rate", "compression_gain", "dead_atoms"):
        assert f"whitebox/layer1/{key}" in m, sorted(m)
        assert math.isfinite(m[f"whitebox/mean/{key}"])


# ----------------------------------------------------------------------------- metrics.jsonl


def test_jsonl_logger_resume_drops_rewound_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JSONLLogger(path)
    for s in range(1, 11):
        log.log_metrics({"train/loss": torch.tensor(10.0 - s), "train/tokens_seen": 64 * s}, step=s)
    log.finalize("success")
    with open(path, "a") as f:
        f.write('{"step": 11, "train/lo')  # torn by a crash mid-write
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 11))
    assert read_metrics(tmp_path)[0] == {"step": 1, "train/loss": 9.0, "train/tokens_seen": 64}

    log = JSONLLogger(path, resume_step=8)  # checkpoint at step 8: 9, 10 and the torn line go
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 9))
    log.log_metrics({"train/loss": 1.5}, step=6)  # even a caller that rewinds further is safe
    log.log_metrics({"train/loss": 1.4}, step=7)
    steps = [r["step"] for r in read_metrics(path)]
    assert steps == [1, 2, 3, 4, 5, 6, 6, 7], steps
    assert steps == sorted(steps)

    JSONLLogger(path)  # a new run replaces the file
    assert read_metrics(path) == []
    assert JSONLLogger(tmp_path / "sub").path == tmp_path / "sub" / "metrics.jsonl"


def test_jsonl_logger_writes_nothing_on_other_ranks(tmp_path):
    log = JSONLLogger(tmp_path / "m.jsonl", rank=1)
    log.log_metrics({"a": 1.0}, step=1)
    assert not (tmp_path / "m.jsonl").exists()


# ----------------------------------------------------------------------------- plots


def _fake_rows(n_layer: int = 3) -> list[dict]:
    rows = []
    for s in range(1, 41):
        rows.append({"step": s, "train/loss": 5.0 * math.exp(-s / 20) + 1, "train/lr": 1e-3})
        if s % 10 == 0:
            rows.append({"step": s, "val/loss": 5.0 * math.exp(-s / 20) + 1.2})
            wb = {"step": s}
            for i in range(n_layer):
                wb[f"whitebox/layer{i}/sparsity"] = 0.5 + 0.01 * i + 0.001 * s
                wb[f"whitebox/layer{i}/coding_rate"] = 40.0 - i - 0.1 * s
                wb[f"whitebox/layer{i}/compression_gain"] = 0.1 * i
            rows.append(wb)
    return rows


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    from matplotlib.image import imread

    h, w = imread(path).shape[:2]
    assert h > 50 and w > 50


def test_plots_are_valid_pngs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _fake_rows()))
    loss = plot_loss_curves(path, tmp_path / "plots" / "loss_curve.png")
    _assert_png(loss)
    wb = plot_whitebox(path, tmp_path / "plots")
    assert [p.name for p in wb] == ["whitebox_layers.png", "whitebox_steps.png"]
    for p in wb:
        _assert_png(p)
    assert not list((tmp_path / "plots").glob(".*tmp*"))  # no temp files left behind
    assert plot_whitebox([{"step": 1, "train/loss": 1.0}], tmp_path / "none") == []
    assert [p.name for p in plot_run(tmp_path)] == ["loss_curve.png", "whitebox_layers.png", "whitebox_steps.png"]


# ----------------------------------------------------------------------------- wandb


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """An isolated, offline wandb: no key, no home-dir writes."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _recipe(mode: str = "auto") -> Recipe:
    r = Recipe()
    r.train.run_name = "track-test"
    r.model.n_layer = 3
    r.tracking.wandb.mode = mode
    r.tracking.wandb.tags = ["test"]
    return r


def test_offline_wandb_run_reads_back_and_resumes_the_same_run(wandb_env, capsys):
    from wbscale.track.wandb_reader import history_values, read_offline_run
    from wbscale.track.wandb_run import finish_wandb, make_wandb_logger, wandb_run_id

    run_dir = wandb_env / "runs" / "track-test"
    recipe = _recipe("auto")  # no key anywhere -> offline
    logger = make_wandb_logger(recipe, run_dir)
    err = capsys.readouterr().err
    assert "offline" in err and "wandb sync" in err and err.count("\n") == 1, err
    run_id = wandb_run_id(run_dir)
    assert run_id and logger.version == run_id
    for s in (1, 2, 3):
        logger.log_metrics({"train/loss": 4.0 - s, "train/lr": 1e-3 * s}, step=s)
    logger.log_text(key="samples", columns=["step", "prompt", "text"], data=[[3, "Once", "upon a time"]], step=3)
    png = plot_loss_curves([{"step": s, "train/loss": 4.0 - s} for s in (1, 2, 3)], wandb_env / "loss.png")
    logger.log_image(key="plots/loss_curve", images=[str(png)], step=3)
    finish_wandb(logger)

    run = read_offline_run(run_dir)
    assert run["run_id"] == run_id and run["project"] == "wbscale" and run["name"] == "track-test"
    assert run["config"]["model"]["n_layer"] == 3
    assert run["config"]["tracking"]["wandb"]["tags"] == ["test"]
    assert run["config"]["env"]["versions"]["torch"] == torch.__version__.split("+")[0] or run["config"]["env"]["versions"]["torch"]
    assert history_values(run, "train/loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    (step, table), = history_values(run, "samples")
    assert step == 3 and table["_type"] == "table-file" and table["nrows"] == 1
    (step, image), = history_values(run, "plots/loss_curve")
    assert step == 3 and "image" in image["_type"]
    assert any(f.startswith("media/table/") for f in run["files"]), run["files"]
    assert any(f.startswith("media/images/") for f in run["files"]), run["files"]
    table_file = next(Path(s).parent / "files" / f for s in run["segments"] for f in run["files"] if f.startswith("media/table/"))
    assert json.loads(table_file.read_text())["data"] == [[3, "Once", "upon a time"]]

    # a resumed (or requeued) process: same run dir -> same id, steps continue, no rewind
    logger = make_wandb_logger(recipe, run_dir)
    assert logger.version == run_id
    logger.log_metrics({"train/loss": 0.5}, step=4)
    logger.log_metrics({"train/loss": 9.9}, step=2)  # rewound: dropped, not logged out of order
    logger.log_metrics({"train/loss": 0.25}, step=5)
    # enough to span many 32 KiB blocks, and one record (100 kB) split over several
    logger.log_hyperparams({"notes": "n" * 100_000})
    for s in range(6, 306):
        logger.log_metrics({f"whitebox/layer{i}/sparsity": s / 1000 + i for i in range(8)}, step=s)
    finish_wandb(logger)
    wandb_file = Path(read_offline_run(run_dir)["segments"][-1])
    assert wandb_file.stat().st_size > 4 * 32768
    run = read_offline_run(run_dir)
    assert len(run["segments"]) == 2
    steps = [s for s, _ in history_values(run, "train/loss")]
    assert steps == [1, 2, 3, 4, 5], steps
    assert history_values(run, "train/loss")[-2:] == [(4, 0.5), (5, 0.25)]
    assert run["config"]["notes"] == "n" * 100_000 and run["config"]["model"]["n_layer"] == 3
    assert history_values(run, "whitebox/layer7/sparsity")[-1] == (305, 305 / 1000 + 7)
    all_steps = [row["_step"] for row in run["history"]]
    assert all_steps == sorted(all_steps) and len(set(all_steps)) == len(all_steps)

    # a checkpoint's id wins over the file, and disabled means no logger
    assert make_wandb_logger(_recipe("disabled"), run_dir) is None


def _wandb_child(run_dir: str, hold: bool) -> None:
    from wbscale.track.wandb_run import finish_wandb, make_wandb_logger

    logger = make_wandb_logger(_recipe("offline"), run_dir)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    if hold:
        time.sleep(600)  # killed here, holding the run
    finish_wandb(logger)
    os._exit(0)


def test_a_killed_child_does_not_leave_its_run_id_busy_in_the_parents_service(wandb_env):
    """A process with a wandb service of its own forks a run that is killed with SIGKILL:
    the resumed run (same id) must start, not be refused with "run ID ... is in use"."""
    import multiprocessing
    import signal

    import wandb

    from wbscale.track.wandb_run import wandb_run_id

    # as after any earlier in-process run: the run is finished, this process's service lives on
    # (a fresh one, so that its token is in os.environ whatever earlier tests did)
    wandb.teardown()
    wandb.init(mode="offline", dir=str(wandb_env), settings=wandb.Settings(silent=True)).finish()
    assert os.environ.get("WANDB_SERVICE"), "wandb no longer exports its service: revisit the fix"
    run_dir = str(wandb_env / "runs" / "child")
    ctx = multiprocessing.get_context("fork")
    first = ctx.Process(target=_wandb_child, args=(run_dir, True))
    first.start()
    deadline = time.monotonic() + 60
    while not wandb_run_id(Path(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the run is registered with a service
    os.kill(first.pid, signal.SIGKILL)
    first.join()
    second = ctx.Process(target=_wandb_child, args=(run_dir, False))
    second.start()
    second.join(120)
    if second.exitcode is None:
        second.kill()
    assert second.exitcode == 0, "the resumed run did not start (run id still busy?)"


class _Answer500(BaseHTTPRequestHandler):
    """A W&B server that is up but fails every request."""

    def _fail(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"errors": [{"message": "unavailable"}]}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _fail

    def log_message(self, *args) -> None:
        pass


def test_wandb_online_without_network_falls_back_to_offline_without_hanging(wandb_env):
    """A black hole (accepts TCP, never answers): the HTTP probe says no, we go offline.
    A server that answers the probe (500) but then wandb.init fails (it keeps retrying until
    init_timeout; wandb may even still talk to the first URL): we go offline too."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel accepts into the backlog; nobody ever answers
    http500 = ThreadingHTTPServer(("127.0.0.1", 0), _Answer500)
    threading.Thread(target=http500.serve_forever, daemon=True).start()
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from wbscale.config import Recipe
        from wbscale.track.wandb_run import make_wandb_logger, finish_wandb
        r = Recipe(); r.tracking.wandb.mode = "online"
        for i, url in enumerate(sys.argv[2:]):
            os.environ["WANDB_BASE_URL"] = url
            t = time.time()
            logger = make_wandb_logger(r, Path(sys.argv[1]) / str(i), init_timeout=4)
            logger.log_metrics({"train/loss": 1.0}, step=1)
            finish_wandb(logger)
            print("OFFLINE", logger.experiment.offline, "SECONDS", round(time.time() - t, 1), flush=True)
        """
    )
    env = dict(os.environ, WANDB_API_KEY="x" * 40)
    env.pop("WANDB_SERVICE", None)  # this process's wandb service, if an earlier test started one
    urls = [f"http://127.0.0.1:{hole.getsockname()[1]}", f"http://127.0.0.1:{http500.server_address[1]}"]
    try:
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", script, str(wandb_env / "run"), *urls],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        elapsed = time.time() - t0
    finally:
        hole.close()
        http500.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OFFLINE True") == 2, proc.stdout + proc.stderr[-2000:]
    assert "cannot reach" in proc.stderr, proc.stderr
    assert "could not start online" in proc.stderr, proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("wbscale:")]
    assert len(ours) == 2 and all("wandb sync" in ln for ln in ours), proc.stderr  # one line each
    assert elapsed < 60


def _write_leveldb_log(path: Path, payloads: list[bytes]) -> None:
    """The writer side of the .wandb format (wandb 0.31's Go writer, transcribed)."""
    import struct
    import zlib

    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += b"\0" * left
                continue
            n = min(left - 7, len(payload))
            frag, payload = payload[:n], payload[n:]
            last = not payload
            kind = 1 if first and last else 2 if first else 4 if last else 3
            out += struct.pack("<IHB", zlib.crc32(frag, zlib.crc32(bytes([kind]))), n, kind) + frag
            first = False
            if last:
                break
    path.write_bytes(bytes(out))


def test_wandb_reader_skips_block_padding_and_stops_at_a_torn_tail(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    from wbscale.track.wandb_reader import iter_records, read_offline_run

    def history(step: int, text: str) -> bytes:
        rec = pb.Record()
        rec.history.step.num = step
        for key, value in (("_step", step), ("text", text)):
            item = rec.history.item.add()
            item.nested_key.append(key)
            item.value_json = json.dumps(value)
        return rec.SerializeToString()

    # first record fills block 0 up to 3 bytes: the reader must skip 3 bytes of padding
    target = 32768 - 7 - 7 - 3
    k = target - len(history(0, ""))
    while len(history(0, "a" * k)) > target:
        k -= 1
    assert len(history(0, "a" * k)) == target
    payloads = [history(0, "a" * k), history(1, "b" * 70_000), history(2, "c")]
    path = tmp_path / "run-abc.wandb"
    _write_leveldb_log(path, payloads)
    assert path.read_bytes()[32765:32768] == b"\0\0\0"
    recs = list(iter_records(path))
    assert [r.history.step.num for r in recs] == [0, 1, 2]
    run = read_offline_run(path)
    assert [(row["_step"], len(row["text"])) for row in run["history"]] == [(0, k), (1, 70_000), (2, 1)]
    path.write_bytes(path.read_bytes()[:-1])  # killed mid-write
    assert [r.history.step.num for r in iter_records(path)] == [0, 1]


def test_other_ranks_never_start_wandb_nor_write_metrics(wandb_env, monkeypatch):
    from wbscale.track.jsonl_logger import launch_rank
    from wbscale.track.wandb_run import make_wandb_logger, wandb_run_id

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # first process of the second node
    assert launch_rank() == 1
    run_dir = wandb_env / "runs" / "rank1"
    logger = make_wandb_logger(_recipe("offline"), run_dir)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.log_hyperparams({"a": 1})
    JSONLLogger(run_dir).log_metrics({"train/loss": 1.0}, step=1)
    assert wandb_run_id(run_dir) is None and not run_dir.exists()


def test_server_probe_does_not_hang_on_a_closed_port(monkeypatch):
    from wbscale.track.wandb_run import server_reachable

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.time()
    assert server_reachable(f"http://127.0.0.1:{port}", timeout=2) is False
    assert time.time() - t0 < 3


# ----------------------------------------------------------------------------- callbacks in a fit


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "[UNK]", "once", "upon", "a", "time", "there", "was", "cat", "dog", "the", "sat"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_callbacks_log_to_jsonl_and_wandb_during_fit(wandb_env):
    import lightning.pytorch as pl

    from wbscale.track.callbacks import Plots, SampleGeneration, WhiteBoxMetrics
    from wbscale.track.wandb_reader import history_values, read_offline_run
    from wbscale.track.wandb_run import finish_wandb, make_wandb_logger

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyCRATE(vocab=12, d=16, n_head=2, n_layer=2, block=16)

        def training_step(self, batch, _):
            _, loss = self.model(batch[:, :-1], batch[:, 1:])
            for logger in self.trainer.loggers:
                logger.log_metrics({"train/loss": loss.item()}, step=self.trainer.global_step + 1)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    data = torch.randint(0, 12, (64, 9))
    run_dir = wandb_env / "runs" / "fit"
    tok = _word_tokenizer()
    samples = SampleGeneration(tok, ["once upon a", "the cat"], 5, 0.8, 5, every=3, out_path=run_dir)
    wandb_logger = make_wandb_logger(_recipe("offline"), run_dir)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", devices=1, logger=[JSONLLogger(run_dir), wandb_logger],
        callbacks=[WhiteBoxMetrics(data[:4, :8], every=2), samples, Plots(run_dir)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=run_dir,
    )
    trainer.fit(LM(), torch.utils.data.DataLoader(data, batch_size=8))
    finish_wandb(wandb_logger)

    rows = read_metrics(run_dir)
    wb_steps = [r["step"] for r in rows if "whitebox/layer0/sparsity" in r]
    assert wb_steps == [2, 4, 6], wb_steps
    assert all(r["whitebox/seconds"] < 5 for r in rows if "whitebox/seconds" in r)
    lines = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in lines] == [(3, "once upon a"), (3, "the cat"), (6, "once upon a"), (6, "the cat")]
    assert all(isinstance(r["text"], str) for r in lines)
    # same seed, same weights -> the same text again
    assert samples.generate(trainer.lightning_module) == [r["text"] for r in lines[2:]]
    for name in ("loss_curve.png", "whitebox_layers.png", "whitebox_steps.png"):
        _assert_png(run_dir / "plots" / name)

    run = read_offline_run(run_dir)
    assert [s for s, _ in history_values(run, "whitebox/layer1/coding_rate")] == [2, 4, 6]
    assert [s for s, _ in history_values(run, "samples")] == [3, 6]
    assert {"plots/loss_curve", "plots/whitebox_layers"} <= {k for row in run["history"] for k in row}
    steps = [row["_step"] for row in run["history"]]
    assert steps == sorted(steps)
