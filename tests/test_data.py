"""Data pipeline: sources, tokenizer, prepare (round trip, resume, checks), loader."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_data_cfg

from wbscale.bench.data import bench_prepare
from wbscale.config import DataConfig
from wbscale.data import prepare as prep
from wbscale.data import shards as shard_format
from wbscale.data.bpe import train_bpe
from wbscale.data.loader import (
    TokenShards,
    TrainStream,
    WindowSampler,
    _FeistelPermutation,
    unigram_entropy,
    val_batches,
)
from wbscale.data.manifest import load_manifest
from wbscale.data.shards import dtype_for_vocab
from wbscale.data.sources import document_split, iter_documents
from wbscale.data.synthetic import generate_stories
from wbscale.data.tokenizer import (
    EOT,
    decode,
    encode,
    eot_id,
    load_tokenizer,
    tokenizer_sha256,
)
from wbscale.errors import UserError

# ---------------------------------------------------------------------------- helpers


def small_cfg(tmp_path: Path, **kw) -> DataConfig:
    return small_data_cfg(tmp_path / "data", **kw)


def expected_text(cfg: DataConfig, split: str) -> str:
    docs = list(iter_documents(cfg))
    return "".join(d + EOT for i, d in enumerate(docs) if document_split(i, cfg) == split)


def split_text(data_dir: Path, split: str) -> str:
    shards = TokenShards(data_dir, split)
    ids = np.concatenate([np.asarray(m) for m in shards.maps])
    return decode(load_tokenizer(data_dir), ids.tolist())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[DataConfig, Path]:
    """One small prepared folder shared by the read-only tests."""
    cfg = small_cfg(tmp_path_factory.mktemp("prepared"))
    return cfg, prep.prepare(cfg, progress=False)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_stories_are_deterministic_and_varied():
    a = generate_stories(2000, seed=7)
    assert a == generate_stories(2000, seed=7)
    assert generate_stories(50, seed=7) == a[:50]  # prefix-stable
    assert generate_stories(50, seed=8) != a[:50]
    sentences = {s for story in a for s in re.split(r"(?<=[.!?\"])\s+", story)}
    assert len(sentences) > 3000, len(sentences)
    assert len(set(a)) == len(a)
    assert sum('"' in s for s in a) > 0.9 * len(a)  # dialogue
    names = {m for s in a for m in re.findall(r"named (\w+)", s)}
    assert len(names) > 30, names


# ---------------------------------------------------------------------------- prepare


def test_prepare_round_trips_text(prepared):
    cfg, data = prepared
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(data / "tokenizer.json")
    assert manifest["eot_id"] == eot_id(load_tokenizer(data))
    assert manifest["fingerprint"] == prep.config_fingerprint(cfg)
    total_docs = 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert split_text(data, split) == expected_text(cfg, split)
        sizes = [s["tokens"] for s in info["shards"]]
        assert all(n == cfg.shard_tokens for n in sizes[:-1]) and 0 < sizes[-1] <= cfg.shard_tokens
        assert info["tokens"] == sum(sizes)
        for s in info["shards"]:
            assert (data / s["file"]).stat().st_size == 2 * s["tokens"]
        total_docs += info["documents"]
    assert total_docs == manifest["documents"] == cfg.synthetic_documents
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert not (data / prep.STATE_FILE).exists()


def test_parallel_prepare_matches_serial(prepared, tmp_path, capsys):
    cfg, serial = prepared
    par_cfg = dataclasses.replace(cfg, workers=2, out_dir=str(tmp_path / "par"))
    report = prep.prepare_data(par_cfg, progress=True)  # stderr is not a TTY under pytest
    assert report.workers == 2 and report.tokens > 0 and report.tokens_per_second > 0
    lines = capsys.readouterr().err.strip().splitlines()
    # plain lines only (no \r status line off a terminal): BPE start/end, then the summary
    assert all(line.startswith(("prepare", "prepared")) and "\r" not in line for line in lines), lines
    assert any("BPE trained" in line for line in lines) and lines[-1].startswith("prepared") and "tokens/s" in lines[-1]
    for name in (serial / "manifest.json", *serial.glob("*.bin"), serial / "tokenizer.json"):
        assert (tmp_path / "par" / name.name).read_bytes() == name.read_bytes(), name.name


def test_second_prepare_does_no_work(tmp_path, capsys):
    cfg = small_cfg(tmp_path)
    prep.prepare(cfg, progress=False)
    before = snapshot(Path(cfg.out_dir))
    capsys.readouterr()
    report = prep.prepare_data(cfg, progress=False)
    assert report.up_to_date and report.documents_tokenized == 0 and report.shards_written == 0
    assert "up to date" in capsys.readouterr().err
    assert snapshot(Path(cfg.out_dir)) == before


@pytest.mark.parametrize(
    "lost",
    [
        ["train_000002.bin"],
        ["train_000003.bin", "train_000004.bin", "train_000006.bin"],
        ["train_000000.bin", "LAST_TRAIN", "val_000000.bin", "tokenizer.json"],
    ],
)
def test_prepare_rebuilds_only_lost_shards(tmp_path, lost):
    cfg = small_cfg(tmp_path)
    data = prep.prepare(cfg, progress=False)
    last_train = sorted(data.glob("train_*.bin"))[-1].name
    lost = [last_train if name == "LAST_TRAIN" else name for name in lost]
    before = snapshot(data)
    for name in lost:
        (data / name).unlink()
    report = prep.prepare_data(cfg, progress=False)
    assert report.shards_written == len([n for n in lost if n.endswith(".bin")])
    assert 0 < report.documents_tokenized < cfg.synthetic_documents / 2
    after = snapshot(data)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    unchanged = [k for k in before if k not in lost]
    assert all(after[k][1] == before[k][1] for k in unchanged)  # nothing else rewritten


def test_prepare_resumes_after_a_crash(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    clean = prep.prepare(small_cfg(tmp_path / "clean"), progress=False)

    real_write, writes = shard_format.atomic_write_bytes, []

    def crash_after_five_shards(path, data):
        if path.suffix == ".bin":
            if len(writes) == 5:
                raise KeyboardInterrupt  # the user pressed Ctrl-C
            writes.append(path)
        real_write(path, data)

    monkeypatch.setattr(shard_format, "atomic_write_bytes", crash_after_five_shards)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cfg, progress=False)
    monkeypatch.undo()
    data = Path(cfg.out_dir)
    assert (data / prep.STATE_FILE).exists() and not (data / "manifest.json").exists()
    with pytest.raises(UserError, match="interrupted.*resumes"):
        load_manifest(data)
    stray = data / ".train_000009.bin.tmp-12345"  # as left by a killed writer
    stray.write_bytes(b"half a shard")

    report = prep.prepare_data(cfg, progress=False)
    assert not stray.exists() and not (data / prep.STATE_FILE).exists()
    assert report.documents_tokenized < cfg.synthetic_documents  # did not start over
    for name in [p.name for p in clean.glob("*.bin")] + ["manifest.json", "tokenizer.json"]:
        assert (data / name).read_bytes() == (clean / name).read_bytes(), name


def test_corrupt_shard_is_detected_and_repaired(tmp_path):
    cfg = small_cfg(tmp_path)
    data = prep.prepare(cfg, progress=False)
    shard = data / "train_000001.bin"
    good = shard.read_bytes()
    raw = bytearray(good)
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"train_000001\.bin.*sha256.*delete it and re-run"):
        load_manifest(data)
    load_manifest(data, verify=False)  # size is right: only the checksum can tell
    shard.write_bytes(good[:-2])
    with pytest.raises(UserError, match=r"train_000001\.bin"):
        load_manifest(data, verify=False)
    report = prep.prepare_data(cfg, progress=False)
    assert report.shards_written == 1 and shard.read_bytes() == good
    load_manifest(data)


def test_changed_config_is_refused_unless_forced(tmp_path):
    cfg = small_cfg(tmp_path)
    prep.prepare(cfg, progress=False)
    changed = dataclasses.replace(cfg, shard_tokens=8192)
    with pytest.raises(UserError, match=r"shard_tokens: 4096 -> 8192.*data\.out_dir.*--force"):
        prep.prepare(changed, progress=False)
    prep.prepare(changed, progress=False, force=True)
    manifest = load_manifest(cfg.out_dir)
    assert manifest["shard_tokens"] == 8192
    assert split_text(Path(cfg.out_dir), "train") == expected_text(cfg, "train")
    assert not (Path(cfg.out_dir) / "train_000015.bin").exists()  # old shards removed


def test_uint32_shards_for_a_vocab_of_65536_or_more(tmp_path):
    assert dtype_for_vocab(65535) == np.dtype("<u2")
    assert dtype_for_vocab(65536) == np.dtype("<u4")
    tok = train_bpe(generate_stories(50, seed=1), 300)
    tok.add_tokens([f"<w{i}>" for i in range(65536)])
    tok_path = tmp_path / "big.json"
    tok.save(str(tok_path))
    docs = [f"Story {i} has a rare word <w{65535 - i}> in it." for i in range(40)]
    src = tmp_path / "docs.txt"
    src.write_text(f"\n{EOT}\n".join(docs))
    cfg = small_cfg(tmp_path, source=str(src), tokenizer=str(tok_path), shard_tokens=1024, val_fraction=0.2)
    data = prep.prepare(cfg, progress=False)
    manifest = load_manifest(data)
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == tok.get_vocab_size()
    assert tokenizer_sha256(data) == tokenizer_sha256(tok_path)  # a byte copy
    ids = np.concatenate(TokenShards(data, "train").maps)
    assert ids.max() >= 65536
    assert split_text(data, "train") == expected_text(cfg, "train")


def test_prepare_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="split is empty: .* gave 1 document.*val_fraction"):
        prep.prepare(small_cfg(tmp_path, max_documents=1), progress=False)
    assert not list((tmp_path / "data").glob("*.bin"))
    prep.prepare(small_cfg(tmp_path, max_documents=30), progress=False)  # fixed: not "a change"
    with pytest.raises(UserError, match=r"no tokenizer file at .*nope\.json.*bpe"):
        prep.prepare(small_cfg(tmp_path, tokenizer=str(tmp_path / "nope.json")), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prep.prepare(small_cfg(tmp_path, out_dir=str(tmp_path / "file")), progress=False)


def test_progress_line_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    prep.prepare(small_cfg(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "prepare: 100%" in err and "300/300" in err and "tokens/s" in err  # the tqdm bar, with a total
    prep.prepare(small_cfg(tmp_path, out_dir=str(tmp_path / "quiet")), progress=False)
    lines = capsys.readouterr().err.strip().splitlines()
    # no bar and no periodic lines: what the tokenizer training says, then the summary
    assert not any("\r" in line or line.startswith("prepare: 300/300") for line in lines), lines
    assert lines[-1].startswith("prepared")


def test_measure_prepare_overhead_reports_both_throughputs():
    cfg = DataConfig(synthetic_documents=200, vocab_size=300, workers=1)
    result = bench_prepare(cfg, repeats=1)
    assert result["raw_encode_batch_tokens_per_second"] > 0
    assert result["prepare_tokens_per_second"] > 0
    assert result["tokens"] > 200 and math.isfinite(result["overhead"])


# ---------------------------------------------------------------------------- sources


def write_local_sources(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i}.\nIt has two lines." for i in range(6)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(f"{docs[0]}\n{EOT}\n{docs[1]}\n{EOT}\n\n")
    with open(root / "b.jsonl", "w") as f:
        for d in docs[2:4]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")
    pq.write_table(pa.table({"text": docs[4:6], "n": [1, 2]}), root / "c.parquet")
    (root / "README.md").write_text("ignored")
    return docs


def test_local_file_and_folder_sources(tmp_path):
    docs = write_local_sources(tmp_path / "src")
    read = lambda src, **kw: list(iter_documents(DataConfig(source=str(src), **kw)))  # noqa: E731
    assert read(tmp_path / "src/a.txt") == docs[:2]
    assert read(tmp_path / "src/b.jsonl") == docs[2:4]
    assert read(tmp_path / "src/c.parquet") == docs[4:6]
    assert read(tmp_path / "src") == docs
    assert read(tmp_path / "src", max_documents=3) == docs[:3]
    assert read(tmp_path / "src/a.txt", separator="") == [f"{docs[0]}\n{EOT}\n{docs[1]}\n{EOT}"]


def test_bad_sources_raise_helpful_errors(tmp_path):
    write_local_sources(tmp_path / "src")
    with pytest.raises(UserError, match=r"b\.jsonl:1: no field 'body'.*text.*data\.text_field"):
        list(iter_documents(DataConfig(source=str(tmp_path / "src/b.jsonl"), text_field="body")))
    with pytest.raises(UserError, match=r"c\.parquet: no column 'txt'.*did you mean 'text'"):
        list(iter_documents(DataConfig(source=str(tmp_path / "src/c.parquet"), text_field="txt")))
    with pytest.raises(UserError, match=r"unsupported file type '\.md'"):
        iter_documents(DataConfig(source=str(tmp_path / "src/README.md")))
    with pytest.raises(UserError, match="no such file or folder.*synthetic-stories"):
        iter_documents(DataConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(UserError, match="did you mean 'synthetic-stories'"):
        iter_documents(DataConfig(source="synthetic-story"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no .txt, .jsonl, .parquet files"):
        iter_documents(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(DataConfig(source=str(tmp_path / "bad.jsonl"))))


def test_hf_source_goes_through_load_dataset(tmp_path):
    docs = write_local_sources(tmp_path / "src")
    only_jsonl = tmp_path / "hf_jsonl"
    only_jsonl.mkdir()
    (only_jsonl / "train.jsonl").write_text((tmp_path / "src/b.jsonl").read_text())
    assert list(iter_documents(DataConfig(source=f"hf:{only_jsonl}"))) == docs[2:4]
    only_parquet = tmp_path / "hf_parquet"
    only_parquet.mkdir()
    (only_parquet / "train.parquet").write_bytes((tmp_path / "src/c.parquet").read_bytes())
    assert list(iter_documents(DataConfig(source=f"hf:{only_parquet}", max_documents=1))) == docs[4:5]
    with pytest.raises(UserError, match="no field 'body'"):
        list(iter_documents(DataConfig(source=f"hf:{only_parquet}", text_field="body")))
    with pytest.raises(UserError, match="hf_split='test'.*could not load"):
        list(iter_documents(DataConfig(source=f"hf:{only_jsonl}", hf_split="test")))

    stories = tmp_path / "hf_stories"
    stories.mkdir()
    with open(stories / "train.jsonl", "w") as f:
        for story in generate_stories(60, seed=2):
            f.write(json.dumps({"story": story}) + "\n")
    cfg = small_cfg(tmp_path, source=f"hf:{stories}", text_field="story", shard_tokens=1024)
    data = prep.prepare(cfg, progress=False)
    assert split_text(data, "val") == expected_text(cfg, "val")
    assert load_manifest(data)["documents"] == 60


def test_unknown_hf_dataset_is_a_user_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # No network here: offline mode makes the hub lookup fail at once instead of retrying.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="hf:no-such-user/no-such-data.*could not load"):
        iter_documents(DataConfig(source="hf:no-such-user/no-such-data"))
    with pytest.raises(UserError, match="no dataset name"):
        iter_documents(DataConfig(source="hf:"))


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_errors(tmp_path):
    tok = train_bpe(generate_stories(100, seed=3), 300)
    text = 'Tom said, "Hi!"\n\n  Ünïcødé 🙂 <|endoftext|> tabs\tand  spaces '
    assert decode(tok, encode(tok, text)) == text
    assert eot_id(tok) == tok.token_to_id(EOT)
    with pytest.raises(UserError, match="run `wbscale data prepare"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- loader


def test_load_manifest_needs_a_prepared_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist.*wbscale data prepare <recipe>"):
        load_manifest(tmp_path / "nothing")
    with pytest.raises(UserError, match="no manifest.json.*wbscale data prepare <recipe>"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    perm = _FeistelPermutation(n, key=1234)
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n > 16:
        assert not np.array_equal(out, np.arange(n))


def test_sampler_is_deterministic_and_covers_each_window_once_per_epoch():
    sizes = [1000, 130, 129, 5000]
    s = WindowSampler(sizes, window=129, seed=3)
    n = s.windows_per_epoch
    assert n == (1000 - 128) // 129 + 1 + 1 + (5000 - 128) // 129
    first = [s.sample_window(g) for g in range(n)]
    again = WindowSampler(sizes, window=129, seed=3)
    assert [again.sample_window(g) for g in range(n)] == first
    for shard, start in first:
        assert 0 <= start and start + 129 <= sizes[shard]
    # non-overlapping: every window is a distinct slot of its shard
    assert len(set(first)) == n
    for shard in range(len(sizes)):
        starts = sorted(st for sh, st in first if sh == shard)
        assert all(b - a >= 129 for a, b in zip(starts, starts[1:], strict=False))
    shards, starts = s.sample_windows(np.arange(n, 2 * n))
    second = list(zip(shards.tolist(), starts.tolist(), strict=True))
    assert second != first and len(set(second)) == n  # a new epoch: new order and offsets
    other = WindowSampler(sizes, window=129, seed=4)
    assert [other.sample_window(g) for g in range(n)] != first


def test_train_stream_resumes_exactly(prepared):
    _, data = prepared
    full = TrainStream(data, "train", seq_len=32, micro_batch_size=4, seed=11)
    it = iter(full)
    batches = [next(it) for _ in range(8)]
    x, y = batches[0]
    assert x.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    resumed = iter(TrainStream(data, "train", 32, 4, 11, start_sample=3 * 4))
    for k in range(3, 8):
        rx, ry = next(resumed)
        assert torch.equal(rx, batches[k][0]) and torch.equal(ry, batches[k][1]), k
    # across an epoch boundary too
    n = full.windows_per_epoch
    k0 = n // 4 - 2
    across = TrainStream(data, "train", 32, 4, 11, start_sample=(k0 + 1) * 4)
    for j in range(4):
        assert torch.equal(across.batch(j)[0], full.batch(k0 + 1 + j)[0]), j
    state = full.state_at((k0 + 4) * 4)
    assert state == {
        "epoch": 1,
        "position": (k0 + 4) * 4 - n,
        "seed": 11,
        "samples": (k0 + 4) * 4,
        "windows_per_epoch": n,
        "seq_len": 32,
    }


def test_two_ranks_together_see_the_one_rank_batch(prepared):
    _, data = prepared
    one = TrainStream(data, "train", 16, micro_batch_size=6, seed=5)
    ranks = [TrainStream(data, "train", 16, 3, 5, rank=r, world_size=2) for r in range(2)]
    for k in range(8):
        joint = torch.cat([r.batch(k)[0] for r in ranks])
        assert torch.equal(joint, one.batch(k)[0]), k
    # and after a resume at a world-size change: 1 rank -> 2 ranks from sample 18
    resumed = [TrainStream(data, "train", 16, 3, 5, start_sample=18, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([r.batch(0)[0] for r in resumed]), one.batch(3)[0])


def test_train_stream_under_dataloader_workers(prepared):
    _, data = prepared
    stream = TrainStream(data, "train", 16, 2, seed=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = [x for (x, _), _ in zip(loader, range(6), strict=False)]
    for k, x in enumerate(got):
        assert torch.equal(x, stream.batch(k)[0]), k


def test_val_batches_are_fixed_and_sized(prepared):
    _, data = prepared
    a = val_batches(data, seq_len=32, batch_size=4, n_batches=3)
    b = val_batches(data, seq_len=32, batch_size=4, n_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 32)
    flat = np.concatenate([np.asarray(m) for m in TokenShards(data, "val").maps])
    assert a[0][0][0].tolist() == flat[:32].tolist()  # the first window, in order
    assert a[0][0][1].tolist() == flat[33:65].tolist()  # non-overlapping
    val_tokens = load_manifest(data)["splits"]["val"]["tokens"]
    many = val_batches(data, seq_len=32, batch_size=4, n_batches=10_000)
    assert 0 < len(many) * 4 * 33 <= val_tokens
    with pytest.raises(UserError, match="val split .* fewer than one validation window"):
        val_batches(data, seq_len=val_tokens + 10, batch_size=4, n_batches=1)
    with pytest.raises(UserError, match="train split .*block_size"):
        TrainStream(data, "train", seq_len=10_000_000, micro_batch_size=1, seed=0)


def test_unigram_entropy_matches_token_counts(prepared):
    _, data = prepared
    ids = np.concatenate([np.asarray(m) for m in TokenShards(data, "train").maps])
    counts = np.bincount(ids)
    p = counts[counts > 0] / counts.sum()
    h = unigram_entropy(data)
    assert h == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert 1.0 < h < math.log(load_manifest(data)["vocab_size"])


def test_lock_refuses_a_concurrent_prepare(tmp_path):
    import fcntl

    out = tmp_path / "data"
    out.mkdir()
    fd = os.open(out / prep.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another `wbscale data prepare` is writing"):
            prep.prepare(small_cfg(tmp_path), progress=False)
    finally:
        os.close(fd)


def hold_prepare_lock(out, seconds: float):
    """A child process holding ``out``'s prepare lock for ``seconds`` (returns once it holds it)."""
    import subprocess

    hold = (
        "import sys, time\nfrom wbscale.locks import acquire\n"
        "lock = acquire(sys.argv[1], 'wbscale data prepare')\nprint('held', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(out / prep.LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_lock_of_a_live_prepare_names_its_holder(tmp_path):
    from wbscale import locks

    out = tmp_path / "data"
    proc = hold_prepare_lock(out, seconds=60)
    try:
        with pytest.raises(UserError, match=rf"another `wbscale data prepare` is writing to .*pid {proc.pid} on "):
            prep.prepare(small_cfg(tmp_path), progress=False)
        assert locks.read_holder(out / prep.LOCK_FILE).pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    prep.prepare(small_cfg(tmp_path), progress=False)  # its holder is gone: taken over
    assert not (out / prep.LOCK_FILE).exists()


def test_fit_waits_for_a_live_prepare_of_its_data_folder(tmp_path, capfd, monkeypatch):
    # The runs of a sweep or a job array share one data folder and start together: the one
    # that finds it locked waits for the holder instead of failing.
    monkeypatch.setattr(prep, "LOCK_POLL_S", 0.1)
    out = tmp_path / "data"
    proc = hold_prepare_lock(out, seconds=1.5)
    try:
        started = time.monotonic()
        prep.prepare(small_cfg(tmp_path), progress=False, wait=True)
        assert proc.poll() is not None and time.monotonic() - started >= 0.5  # it waited for the holder
    finally:
        proc.kill()
        proc.wait()
    err = capfd.readouterr().err
    assert err.count("waiting for another process preparing") == 1 and f"pid {proc.pid} on " in err
    assert load_manifest(out)["vocab_size"] > 0


def test_lock_left_by_a_killed_prepare_is_taken_over(tmp_path, capfd):
    import socket
    import subprocess

    out = tmp_path / "data"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = out / prep.LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00Z"}))
    prep.prepare(small_cfg(tmp_path), progress=False)
    err = capfd.readouterr().err
    assert f"taking over the stale lock {lock} of pid {dead.pid}" in err and "no longer running" in err
    assert not lock.exists()
    lock.write_text("")  # the empty file older versions left in every prepared folder
    prep.prepare(small_cfg(tmp_path), progress=False)
    assert "empty or unreadable" in capfd.readouterr().err
