"""The stages of `wbscale bench gpu` (scheduled by :mod:`wbscale.bench.gpu`).

Each ``stage_<name>(ctx)`` runs in a process of its own, saves what it has measured with
``ctx.emit(...)`` as it goes, watches ``ctx.time_left()`` before anything slow (a
torch.compile), and returns its last fields. The measuring functions under them
(:func:`breakdown_rows`, :func:`train_bench`, :func:`generate_bench`) take the device and
sizes as arguments, so the tests run them on CPU with tiny models.

Imports here are torch, triton (through the kernels) and wbscale's own config, models,
kernels and kernel bench: nothing from deepspeed, wandb or datasets, and not lightning.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from wbscale.bench import kernels as kbench
from wbscale.hardware import device_peak_flops, mfu
from wbscale.provenance import cpu_model, git_commit, package_versions

VARIANTS = ("overcomplete", "square")
ETA = LAM = 0.1
GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT / llm.c train it
BENCH_TOKENS, BENCH_DIMS = 16384, (768, 1024)
_PACKAGES = (
    "torch", "triton", "lightning", "transformers", "tokenizers", "safetensors", "numpy",
    "pyyaml", "deepspeed", "wandb", "datasets",
)  # fmt: skip


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s of ``device`` or None, which table said so)."""
    if device.type != "cuda":
        return None, "none (not a GPU)"
    peak = device_peak_flops(device)
    return peak, "wbscale.hardware" if peak else "wbscale.hardware: unknown device"


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("this stage needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda")


# --------------------------------------------------------------------------------------
# 1 env
# --------------------------------------------------------------------------------------


def _nvidia_smi() -> dict[str, str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    fields = (
        "name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem",
        "clocks.max.mem", "power.draw", "power.limit", "temperature.gpu", "memory.total",
        "pcie.link.gen.current", "pcie.link.width.current", "compute_mode",
    )  # fmt: skip
    try:
        proc = subprocess.run(
            [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-300:]}
    values = [v.strip() for v in proc.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values, strict=False))


def environment() -> dict[str, Any]:
    """Versions, commit, host and (if any) GPU facts. Safe on a machine without a GPU."""
    data: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **{k: v for k, v in kbench.kernel_versions().items() if k != "python"},
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": package_versions(_PACKAGES),
        "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        from wbscale.kernels import ista_triton as it

        data["kernels"] = {
            "relaxed_atomics": it._RELAXED_ATOMICS,
            "autotune_tiles": [list(t) for t in it._GPU_TILES],
            "fixed_config": dict(it.FIXED_CONFIG),
            "tune_min_tokens": it.TUNE_MIN_TOKENS,
            "tune_min_tokens_no_grad": it.TUNE_MIN_TOKENS_NO_GRAD,
        }
    except Exception as err:  # noqa: BLE001 - report it, the rest of env still counts
        data["kernels"] = {"import_error": f"{type(err).__name__}: {err}"}
    if not torch.cuda.is_available():
        data["device_name"] = f"cpu ({cpu_model()})"
        data["note"] = "No GPU present: only this stage can run here."
        return data
    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    peak, source = peak_flops(device)
    data.update(
        device_name=props.name,
        device_count=torch.cuda.device_count(),
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
        peak_bf16_tflops=None if peak is None else peak / 1e12,
        peak_flops_source=source,
        nvidia_smi=_nvidia_smi(),
    )
    return data


def stage_env(ctx) -> dict[str, Any]:
    data = environment()
    ctx.emit(**data)
    print(f"{data['device_name']} · torch {data['torch']} · triton {data['triton']}")
    return data


# --------------------------------------------------------------------------------------
# 2 compile: every Triton binary the later stages launch, in parallel
# --------------------------------------------------------------------------------------


def _block_pass(variant: str, t: int, d: int, dtype: torch.dtype, save: str, device, grad=True):
    from wbscale.kernels.ista_triton import ista_triton

    m = kbench.dictionary_size(variant, d)
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=grad)
    w = (torch.randn(m, d, device=device, dtype=dtype) / d**0.5).requires_grad_(grad)
    y = ista_triton(x, w, variant=variant, eta=ETA, lam=LAM, save_activations=save)
    if grad:
        y.backward(torch.randn_like(y))


def compile_plan(quick: bool) -> list[dict[str, Any]]:
    """The block passes (variant, tokens, d, dtype, save, grad) the later stages make."""
    t, dims = (4096, (768,)) if quick else (BENCH_TOKENS, BENCH_DIMS)
    plan = []
    for variant in VARIANTS:
        for dtype in ("bf16", "fp32"):
            plan.append(dict(variant=variant, t=257, d=64, dtype=dtype, save="all"))
            plan.append(dict(variant=variant, t=4096, d=768, dtype=dtype, save="all"))
        for d in dims:
            for save in ("all", "x_u", "x"):
                plan.append(dict(variant=variant, t=t, d=d, dtype="bf16", save=save))
        # generation: no grad, the fixed config, both divisibility classes of the row count
        for rows in (128, 129):
            plan.append(dict(variant=variant, t=rows, d=768, dtype="bf16", save="all", grad=False))
    return plan


def collect_jobs(plan: Sequence[dict[str, Any]], device) -> dict[str, dict[str, Any]]:
    """Dry-run every planned pass (and the breakdown's epilogue-free replays) -> unique jobs."""
    from wbscale.kernels import ista_triton as it

    jobs: dict[str, dict[str, Any]] = {}
    for p in plan:
        with it.collect_compile_jobs() as found:
            with it.trace_gemms() as launches:
                _block_pass(
                    p["variant"], p["t"], p["d"], kbench.DTYPES[p["dtype"]], p["save"], device,
                    grad=p.get("grad", True),
                )  # fmt: skip
            for launch in launches:  # not traced again: the list stays as it is
                it.replay(launch, epilogue=False)
        for job in found:
            jobs.setdefault(it.job_key(job), job)
    return jobs


def _precompile_worker(job: dict[str, Any]) -> float:
    started = time.time()
    from wbscale.kernels import ista_triton as it

    it.precompile(job)
    return time.time() - started


def stage_compile(ctx) -> dict[str, Any]:
    import concurrent.futures as cf
    import multiprocessing

    device = _require_cuda()
    started = time.time()
    jobs = collect_jobs(compile_plan(ctx.quick), device)
    torch.cuda.empty_cache()
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1, 32))
    ctx.emit(jobs=len(jobs), workers=workers, collect_s=round(time.time() - started, 1))
    print(f"{len(jobs)} Triton binaries to build on {workers} processes", flush=True)
    done, failed, times = 0, [], []
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_precompile_worker, job): key for key, job in jobs.items()}
        for future in cf.as_completed(futures):
            try:
                times.append(future.result())
                done += 1
            except Exception as err:  # noqa: BLE001 - a config that does not fit, say
                failed.append(
                    {"job": futures[future][:300], "error": f"{type(err).__name__}: {err}"[:500]}
                )
            if (done + len(failed)) % 8 == 0:
                ctx.emit(compiled=done, failed=failed)
    total = time.time() - started
    print(f"built {done}, failed {len(failed)} in {total:.1f} s", flush=True)
    return {
        "compiled": done,
        "failed": failed,
        "wall_s": round(total, 1),
        "compile_s_sum": round(sum(times), 1),
        "compile_s_max": round(max(times, default=0.0), 1),
    }


# --------------------------------------------------------------------------------------
# 3 correctness
# --------------------------------------------------------------------------------------


def save_mode_agreement(variant: str, t: int, d: int, dtype: torch.dtype, device) -> dict[str, Any]:
    """Outputs and gradients of "x_u" and "x" against "all" (same tiles: bit-equal, except
    the split-K weight gradient, whose atomics add in a run-dependent order)."""
    from wbscale.kernels.ista_triton import ista_triton

    gen = torch.Generator(device=device).manual_seed(0)
    m = kbench.dictionary_size(variant, d)
    x = torch.randn(t, d, device=device, dtype=dtype, generator=gen)
    w = torch.randn(m, d, device=device, dtype=dtype, generator=gen) / d**0.5
    gy = torch.randn(t, d, device=device, dtype=dtype, generator=gen)
    results = {}
    for save in ("all", "x_u", "x"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = ista_triton(xr, wr, variant=variant, eta=ETA, lam=LAM, save_activations=save)
        y.backward(gy)
        results[save] = (y.detach(), xr.grad, wr.grad)
    row: dict[str, Any] = {"variant": variant, "tokens": t, "d": d, "dtype": str(dtype)}
    ref = results["all"]
    # the weight gradient in bf16: a different atomic order may flip the last bit of a few
    gw_tol = 1e-5 if dtype == torch.float32 else 8e-3
    ok = True
    for save in ("x_u", "x"):
        y, gx, gw = results[save]
        gw_err = float((gw.double() - ref[2].double()).norm() / ref[2].double().norm())
        row[save] = {
            "y_equal": bool(torch.equal(y, ref[0])),
            "gx_equal": bool(torch.equal(gx, ref[1])),
            "gw_rel_err": gw_err,
        }
        ok &= row[save]["y_equal"] and row[save]["gx_equal"] and gw_err < gw_tol
    row["ok"] = bool(ok)
    return row


def stage_correctness(ctx) -> dict[str, Any]:
    device = _require_cuda()
    shapes = ((257, 64), (1024, 256)) if ctx.quick else ((257, 64), (4096, 768))
    rows: list[dict[str, Any]] = []
    for dtype in ("bf16", "fp32"):
        for variant in VARIANTS:
            for t, d in shapes:
                started = time.time()
                row = kbench.correctness_sweep(variant, dtype, (t,), (d,), device="cuda")[0]
                row.update(variant=variant, dtype=dtype, seconds=round(time.time() - started, 2))
                rows.append(row)
                ctx.emit(rows=rows)
                print(
                    f"{variant:<12} {dtype} T={t:<5} d={d:<4} y {row['y_err']:.1e} gx "
                    f"{row['grad_x_err']:.1e} gW {row['grad_w_err']:.1e} flips "
                    f"{100 * row['mask_flips']:.2f}% {'ok' if row['ok'] else 'MISMATCH'}",
                    flush=True,
                )
    t, d = shapes[-1]
    modes = []
    for variant in VARIANTS:
        modes.append(save_mode_agreement(variant, t, d, torch.bfloat16, device))
        ctx.emit(save_modes=modes)
    bad = [r for r in rows if not r["ok"]] + [r for r in modes if not r["ok"]]
    ctx.emit(ok=not bad)
    if bad:
        raise AssertionError(f"{len(bad)} correctness check(s) failed: see rows / save_modes")
    return {"ok": True}


# --------------------------------------------------------------------------------------
# 4 kernels
# --------------------------------------------------------------------------------------

_BENCH_IMPLS = (  # most valuable first: a time-out keeps these
    ("triton", "all"), ("floor", None), ("eager", None), ("triton", "x_u"), ("triton", "x"),
    ("compile", None),
)  # fmt: skip


def stage_kernels(ctx) -> dict[str, Any]:
    from wbscale.kernels.ista_triton import tuned_configs

    _require_cuda()
    t, dims = (4096, (768,)) if ctx.quick else (BENCH_TOKENS, BENCH_DIMS)
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        for d in dims:
            for impl, save in _BENCH_IMPLS:
                base = {"impl": impl, "save": save, "variant": variant, "tokens": t, "d": d,
                        "m": kbench.dictionary_size(variant, d)}  # fmt: skip
                if impl == "compile" and ctx.time_left() < 45:
                    row = {**base, "error": "skipped: too little time left for torch.compile"}
                else:
                    try:
                        row = kbench._measure(impl, variant, torch.bfloat16, t, d, save or True)
                        row.update(save=save, variant=variant)
                    except torch.cuda.OutOfMemoryError:
                        row = {**base, "error": "out of memory"}
                    torch.cuda.empty_cache()
                rows.append(row)
                ctx.emit(rows=rows, autotune=tuned_configs())
                print(f"{variant:<12} {save or '':<3} {kbench._row_line(row)}", flush=True)
    return {"rows": rows, "autotune": tuned_configs(), "ratios": kernel_ratios(rows)}


def kernel_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, d): Triton vs floor / eager / compile, and what x_u costs and saves."""
    out = []
    shapes = sorted({(r["variant"], r["d"]) for r in rows})
    for variant, d in shapes:
        group = {
            (r["impl"], r.get("save")): r for r in rows if (r["variant"], r["d"]) == (variant, d)
        }

        def ms(key, mode="fwd+bwd", group=group):
            r = group.get(key)
            return None if r is None or "error" in r else r[f"{mode}_ms"]["median"]

        def div(a, b):
            return None if a is None or b is None or b == 0 else round(a / b, 3)

        tri = ms(("triton", "all"))
        eager_held = (group.get(("eager", None)) or {}).get("held_after_fwd_mb")
        xu_held = (group.get(("triton", "x_u")) or {}).get("held_after_fwd_mb")
        out.append(
            {
                "variant": variant,
                "d": d,
                "triton_over_floor": div(tri, ms(("floor", None))),
                "eager_over_triton": div(ms(("eager", None)), tri),
                "compile_over_triton": div(ms(("compile", None)), tri),
                "x_u_time_over_all": div(ms(("triton", "x_u")), tri),
                "x_u_held_over_eager": div(xu_held, eager_held),
                "x_held_over_eager": div(
                    (group.get(("triton", "x")) or {}).get("held_after_fwd_mb"), eager_held
                ),
            }
        )
    return out


# --------------------------------------------------------------------------------------
# 5 breakdown: each GEMM of the block against cuBLAS
# --------------------------------------------------------------------------------------


def _cublas_operands(segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch as one torch.matmul: K-concatenated segments, A in the layout Triton reads."""
    if len(segments) == 1:
        a, b, _ = segments[0]
        return a, b
    a = torch.cat([s[0].t() for s in segments], dim=0).t()
    b = torch.cat([s[1] for s in segments], dim=0)
    return a, b


def breakdown_rows(
    variant: str,
    t: int,
    d: int,
    dtype: torch.dtype,
    device,
    timer: Callable[[Callable, Any], list[float]] = kbench._time,
) -> list[dict[str, Any]]:
    """One row per GEMM of a fwd+bwd: Triton as launched, Triton without its epilogue, and
    torch.matmul on the same operands (ms medians and TFLOP/s). ``timer`` as in kbench."""
    from wbscale.kernels import ista_triton as it

    m = kbench.dictionary_size(variant, d)
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(m, d, device=device, dtype=dtype) / d**0.5).requires_grad_()
    gy = torch.randn(t, d, device=device, dtype=dtype)
    with it.trace_gemms() as launches:
        it.ista_triton(x, w, variant=variant, eta=ETA, lam=LAM).backward(gy)
    rows = []
    for launch in launches:
        mm, nn, kk = launch["mnk"]
        flops = 2 * mm * nn * kk
        a, b = _cublas_operands(launch["segments"])
        times = {
            "triton": timer(lambda launch=launch: it.replay(launch), None),
            "triton_no_epilogue": timer(
                lambda launch=launch: it.replay(launch, epilogue=False), None
            ),
            "cublas": timer(lambda a=a, b=b: torch.matmul(a, b), None),
        }
        row: dict[str, Any] = {
            "variant": variant, "launch": launch["name"], "m": mm, "n": nn, "k": kk,
            "config": launch["config"], "tuned": launch["tuned"],
        }  # fmt: skip
        for name, (med, _, _) in times.items():
            row[f"{name}_ms"] = med
            row[f"{name}_tflops"] = flops / (med * 1e-3) / 1e12 if med else None
        row["triton_over_cublas"] = times["triton"][0] / times["cublas"][0]
        row["epilogue_share"] = 1 - times["triton_no_epilogue"][0] / times["triton"][0]
        rows.append(row)
    return rows


def stage_breakdown(ctx) -> dict[str, Any]:
    device = _require_cuda()
    t, d = (4096, 768) if ctx.quick else (BENCH_TOKENS, 768)
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        rows += breakdown_rows(variant, t, d, torch.bfloat16, device)
        ctx.emit(rows=rows)
        torch.cuda.empty_cache()
    for r in rows:
        print(
            f"{r['variant']:<12} {r['launch']:<4} {r['m']}x{r['n']}x{r['k']}: triton "
            f"{r['triton_ms']:.3f} ms (no epilogue {r['triton_no_epilogue_ms']:.3f}) cuBLAS "
            f"{r['cublas_ms']:.3f} ms -> {r['triton_over_cublas']:.2f}x",
            flush=True,
        )
    return {"rows": rows}


# --------------------------------------------------------------------------------------
# 6 train, 7 generate
# --------------------------------------------------------------------------------------


def _model(arch: str, kernel: str, n_layer: int, n_head: int, n_embd: int, block: int,
           vocab: int, save: bool | str = True):  # fmt: skip
    from wbscale.config import ModelConfig
    from wbscale.models import build_model

    cfg = ModelConfig(
        arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block,
        vocab_size=vocab, dropout=0.0, ista_kernel=kernel, ista_save_activations=save,
    )  # fmt: skip
    return build_model(cfg)


def train_bench(
    arch: str,
    kernel: str = "auto",
    compile: bool = False,
    *,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    block: int = 1024,
    batch: int = 16,
    vocab: int = GPT2_VOCAB,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cuda",
    save: bool | str = True,
    loss_chunk: int = 8192,
) -> dict[str, Any]:
    """Plain-PyTorch training steps on random tokens: bf16 autocast on CUDA, fp32 weights,
    AdamW as ``fit`` builds it (fused on CUDA), the LM-head loss ``loss_chunk`` tokens at a
    time (0: full logits); tokens/s, MFU (model FLOPs per token x tokens/s / dense bf16
    peak), memory."""
    from wbscale.train.module import adamw_implementation

    dev = torch.device(device)
    torch.manual_seed(0)
    model = _model(arch, kernel, n_layer, n_head, n_embd, block, vocab, save).to(dev)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **adamw_implementation(model)
    )
    graph_breaks = None
    if compile:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        forward = torch.compile(model)
    else:
        forward = model
    tokens = torch.randint(0, vocab, (batch, block + 1), device=dev)
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            _, loss = forward(idx, targets, loss_chunk=loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    started = time.time()
    for _ in range(warmup):
        loss = step()
    _sync(dev)
    warmup_s = time.time() - started
    if compile:
        graph_breaks = int(sum(counters["graph_break"].values()))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    for _ in range(steps):
        loss = step()
    _sync(dev)
    elapsed = time.time() - started
    tokens_per_s = batch * block * steps / elapsed
    fpt = model.flops_per_token(block)
    peak, _ = peak_flops(dev)
    row = {
        "arch": arch,
        "ista_kernel": kernel if arch == "crate" else None,
        "save": save if arch == "crate" else None,
        "compile": compile,
        "loss_chunk": loss_chunk,
        "batch": batch,
        "block": block,
        "params_m": round(model.num_params() / 1e6, 1),
        "step_ms": 1e3 * elapsed / steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "model_tflops": fpt * tokens_per_s / 1e12,
        "mfu": mfu(fpt, tokens_per_s, peak),
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None
        ),
        "warmup_s": round(warmup_s, 1),
        "loss": float(loss),
        "graph_breaks": graph_breaks,
    }
    return row  # the model and optimiser go with this frame; the stage empties the cache


def _train_plan(quick: bool) -> list[dict[str, Any]]:
    runs = [
        dict(arch="crate", kernel="triton", compile=False),
        dict(arch="gpt2", compile=False),
        dict(arch="crate", kernel="eager", compile=False),
        dict(arch="crate", kernel="triton", compile=True),
        dict(arch="gpt2", compile=True),
        dict(arch="crate", kernel="triton", compile=False, save="x_u"),
        dict(arch="crate", kernel="eager", compile=True),
        dict(arch="gpt2", compile=False, loss_chunk=0),  # what the full fp32 logits cost
    ]
    sizes = dict(batch=4, steps=3, warmup=2) if quick else {}
    return [{**r, **sizes} for r in runs]


def stage_train(ctx) -> dict[str, Any]:
    _require_cuda()
    rows: list[dict[str, Any]] = []
    for run in _train_plan(ctx.quick):
        label = " ".join(f"{k}={v}" for k, v in run.items())
        need = 80 if run.get("compile") else 20
        if ctx.time_left() < need:
            rows.append({**run, "error": f"skipped: {ctx.time_left():.0f} s left, needs ~{need}"})
        else:
            try:
                rows.append(train_bench(**run))
            except torch.cuda.OutOfMemoryError:
                rows.append({**run, "error": "out of memory"})
            torch.cuda.empty_cache()
        ctx.emit(rows=rows)
        r = rows[-1]
        if "error" in r:
            print(f"{label}: {r['error']}", flush=True)
        else:
            mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(
                f"{label}: {r['tokens_per_s']:,.0f} tok/s, {r['step_ms']:.1f} ms/step, MFU {mfu}, "
                f"peak {r['peak_memory_gib']} GiB, warmup {r['warmup_s']} s",
                flush=True,
            )
    return {"rows": rows}


def generate_bench(
    arch: str,
    kernel: str = "auto",
    *,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    block: int = 1024,
    vocab: int = GPT2_VOCAB,
    batch: int = 1,
    prompt: int = 128,
    new_tokens: int = 128,
    device: str = "cuda",
    use_cache: bool = True,
) -> dict[str, Any]:
    """Greedy generation tokens/s (bf16 weights on CUDA); ``autotune_runs`` counts the new
    autotuner entries it caused (the fixed small-problem config keeps it at 0)."""
    from wbscale.kernels.ista_triton import tuned_configs

    dev = torch.device(device)
    torch.manual_seed(0)
    model = _model(arch, kernel, n_layer, n_head, n_embd, block, vocab).to(dev)
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    idx = torch.randint(0, vocab, (batch, prompt), device=dev)
    tuned_before = len(tuned_configs())
    started = time.time()
    options = _generate_options(model, use_cache)
    model.generate(idx, max_new_tokens=4, temperature=0.0, **options)
    _sync(dev)
    warmup_s = time.time() - started
    started = time.time()
    out = model.generate(idx, max_new_tokens=new_tokens, temperature=0.0, **options)
    _sync(dev)
    elapsed = time.time() - started
    row = {
        "arch": arch,
        "ista_kernel": kernel if arch == "crate" else None,
        "batch": batch,
        "use_cache": options.get("use_cache"),
        "prompt": prompt,
        "new_tokens": new_tokens,
        "tokens_per_s": batch * new_tokens / elapsed,
        "ms_per_token": 1e3 * elapsed / new_tokens,
        "warmup_s": round(warmup_s, 2),
        "autotune_runs": len(tuned_configs()) - tuned_before,
        "generated": int(out.shape[1] - prompt),
    }
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _generate_options(model, use_cache: bool) -> dict[str, Any]:
    """``use_cache`` where this model's generate() has it (the KV cache), else nothing."""
    import inspect

    params = inspect.signature(model.generate).parameters
    return {"use_cache": use_cache} if "use_cache" in params else {}


def stage_generate(ctx) -> dict[str, Any]:
    _require_cuda()
    runs = [
        dict(arch="crate", kernel="triton", batch=1),
        dict(arch="gpt2", batch=1),
        dict(arch="crate", kernel="eager", batch=1),
        dict(arch="crate", kernel="triton", batch=8),
        dict(arch="gpt2", batch=8),
        # no cache: every step runs the whole, growing context (a new length each token)
        dict(arch="crate", kernel="triton", batch=1, use_cache=False),
    ]
    sizes = dict(prompt=32, new_tokens=16) if ctx.quick else {}
    rows: list[dict[str, Any]] = []
    for run in runs:
        if ctx.time_left() < 8:
            rows.append({**run, "error": "skipped: time"})
        else:
            rows.append(generate_bench(**run, **sizes))
        ctx.emit(rows=rows)
        r = rows[-1]
        print(
            " ".join(f"{k}={v}" for k, v in run.items())
            + (f": {r['error']}" if "error" in r else
               f": {r['tokens_per_s']:.1f} tok/s ({r['ms_per_token']:.1f} ms/token), "
               f"autotune runs {r['autotune_runs']}"),
            flush=True,
        )  # fmt: skip
    return {"rows": rows}


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def summarize(stage: str, data: dict[str, Any]) -> list[str]:
    """Markdown lines for one stage's data (partial data too)."""
    fn = _SUMMARIES.get(stage)
    return fn(data) if fn else []


def _summary_env(d: dict[str, Any]) -> list[str]:
    smi = d.get("nvidia_smi", {})
    lines = [
        f"- device: {d.get('device_name')} (cc {d.get('capability', '—')}, {d.get('sm_count', '—')} SMs, "
        f"{d.get('memory_gib', '—')} GiB, L2 {d.get('l2_cache_mib', '—')} MiB)",
        f"- peak dense bf16: {_f(d.get('peak_bf16_tflops'), '.0f')} TFLOP/s ({d.get('peak_flops_source', '—')})",
        f"- clocks: SM {smi.get('clocks.sm', '—')} (max {smi.get('clocks.max.sm', '—')}), memory "
        f"{smi.get('clocks.mem', '—')} (max {smi.get('clocks.max.mem', '—')}); power limit "
        f"{smi.get('power.limit', '—')}; driver {smi.get('driver_version', '—')}",
        f"- python {d.get('python')}, torch {d.get('torch')}, triton {d.get('triton')}, CUDA "
        f"{d.get('cuda')}, cuDNN {d.get('cudnn')}; commit {d.get('git_commit')}",
    ]
    missing = [k for k, v in (d.get("packages") or {}).items() if v is None]
    if missing:
        lines.append(f"- not installed: {', '.join(missing)}")
    if d.get("note"):
        lines.append(f"- {d['note']}")
    return lines


def _summary_compile(d: dict[str, Any]) -> list[str]:
    return [
        f"{d.get('compiled', 0)} of {d.get('jobs', '?')} Triton binaries built on "
        f"{d.get('workers', '?')} processes in {_f(d.get('wall_s'), '.1f')} s (sum of compile "
        f"times {_f(d.get('compile_s_sum'), '.1f')} s); failed: {len(d.get('failed') or [])}",
    ]


def _summary_correctness(d: dict[str, Any]) -> list[str]:
    lines = [
        "Norm-wise relative error vs float64 (gradients on the kernel's own active set).",
        "",
        "| variant | dtype | T | d | y | code | grad x | grad W | mask flips | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in d.get("rows", []):
        lines.append(
            f"| {r['variant']} | {r['dtype']} | {r['tokens']} | {r['d']} | {r['y_err']:.1e} | "
            f"{r['code_err']:.1e} | {r['grad_x_err']:.1e} | {r['grad_w_err']:.1e} | "
            f"{100 * r['mask_flips']:.2f}% | {'yes' if r['ok'] else '**NO**'} |"
        )
    for r in d.get("save_modes", []):
        cells = "; ".join(
            f"{s}: y {'=' if r[s]['y_equal'] else '≠'}, gx {'=' if r[s]['gx_equal'] else '≠'}, "
            f"gW rel {r[s]['gw_rel_err']:.1e}"
            for s in ("x_u", "x")
        )
        lines.append(f"- save modes vs all, {r['variant']} T={r['tokens']} d={r['d']}: {cells}")
    return lines


def _summary_kernels(d: dict[str, Any]) -> list[str]:
    lines = [
        "fwd+bwd ms (median); memory MiB held after forward / peak.",
        "",
        "| variant | d | impl | save | fwd | bwd | fwd+bwd | TFLOP/s | held | peak |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d.get("rows", []):
        if "error" in r:
            lines.append(
                f"| {r['variant']} | {r['d']} | {r['impl']} | {r.get('save') or ''} | {r['error']} |||||"
            )
            continue
        lines.append(
            f"| {r['variant']} | {r['d']} | {r['impl']} | {r.get('save') or ''} | "
            f"{r['fwd_ms']['median']:.3f} | {r['bwd_ms']['median']:.3f} | {r['fwd+bwd_ms']['median']:.3f} | "
            f"{r['fwd+bwd_tflops']:.0f} | {_f(r.get('held_after_fwd_mb'), '.0f')} | {_f(r.get('peak_mb'), '.0f')} |"
        )
    ratios = d.get("ratios") or kernel_ratios([r for r in d.get("rows", []) if "variant" in r])
    if ratios:
        lines += [
            "",
            "| variant | d | triton / floor | eager / triton | compile / triton | x_u time / all | x_u held / eager | x held / eager |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for q in ratios:
            lines.append(
                f"| {q['variant']} | {q['d']} | {_f(q['triton_over_floor'], '.2f')} | "
                f"{_f(q['eager_over_triton'], '.2f')} | {_f(q['compile_over_triton'], '.2f')} | "
                f"{_f(q['x_u_time_over_all'], '.2f')} | {_f(q['x_u_held_over_eager'], '.2f')} | "
                f"{_f(q['x_held_over_eager'], '.2f')} |"
            )
    if d.get("autotune"):
        lines += ["", "Autotuner choices:", ""]
        for a in d["autotune"]:
            c = a["config"]
            key = a["key"]
            lines.append(
                f"- {a['kernel']} M~{key.get('M_BUCKET')} N={key.get('N')} K~{key.get('K_BUCKET')} "
                f"seg={key.get('NUM_SEG')} aux={key.get('HAS_AUX')} mask={key.get('HAS_MASK')} "
                f"relu={key.get('RELU')}: {c.get('BLOCK_M')}x{c.get('BLOCK_N')}x{c.get('BLOCK_K')} "
                f"w{c.get('num_warps')} s{c.get('num_stages')} split {c.get('SPLIT_K')} "
                f"subtile {c.get('EPI_SUBTILE')}"
            )
    return lines


def _summary_breakdown(d: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | GEMM | M x N x K | tile | triton ms | no-epilogue ms | cuBLAS ms | triton / cuBLAS | epilogue share |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in d.get("rows", []):
        c = r.get("config") or {}
        lines.append(
            f"| {r['variant']} | {r['launch']} | {r['m']}x{r['n']}x{r['k']} | "
            f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')} s{c.get('SPLIT_K')} | {r['triton_ms']:.3f} | "
            f"{r['triton_no_epilogue_ms']:.3f} | {r['cublas_ms']:.3f} | {r['triton_over_cublas']:.2f} | "
            f"{100 * r['epilogue_share']:.0f}% |"
        )
    return lines


def _summary_train(d: dict[str, Any]) -> list[str]:
    lines = [
        "| model | ISTA | save | compile | loss chunk | tokens/s | ms/step | MFU | peak GiB | graph breaks | warmup s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d.get("rows", []):
        head = (
            f"| {r['arch']} | {r.get('ista_kernel') or r.get('kernel') or ''} | {r.get('save') or ''} | "
            f"{r.get('compile')} | {r.get('loss_chunk', 8192) or 'full logits'} |"
        )
        if "error" in r:
            lines.append(f"{head} {r['error']} ||||||")
            continue
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"{head} {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {mfu} | {_f(r['peak_memory_gib'], '.1f')} | "
            f"{'' if r['graph_breaks'] is None else r['graph_breaks']} | {r['warmup_s']} |"
        )
    return lines


def _summary_generate(d: dict[str, Any]) -> list[str]:
    lines = [
        "| model | ISTA | batch | KV cache | tokens/s | ms/token | autotune runs |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in d.get("rows", []):
        head = (
            f"| {r['arch']} | {r.get('ista_kernel') or r.get('kernel') or ''} | {r['batch']} | "
            f"{r.get('use_cache', True)} |"
        )
        if "error" in r:
            lines.append(f"{head} {r['error']} |||")
        else:
            lines.append(
                f"{head} {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {r['autotune_runs']} |"
            )
    return lines


_SUMMARIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "env": _summary_env,
    "compile": _summary_compile,
    "correctness": _summary_correctness,
    "kernels": _summary_kernels,
    "breakdown": _summary_breakdown,
    "train": _summary_train,
    "generate": _summary_generate,
}
