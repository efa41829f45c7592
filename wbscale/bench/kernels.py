"""`wbscale bench kernels`: the fused ISTA kernels against eager, torch.compile and the GEMM floor.

On CUDA, for every (tokens, d) it times forward, backward and forward+backward with
``triton.testing.do_bench`` (median, p20, p80 in ms) and measures peak memory for four
implementations of the same ISTA block:

- ``eager``: the minimal-GEMM PyTorch reference (``wbscale.kernels.reference``);
- ``compile``: ``torch.compile`` of that reference;
- ``triton``: the fused kernels (``wbscale.kernels.ista_triton``);
- ``floor``: the same GEMMs back to back with ``torch.matmul`` and no element-wise work
  (overcomplete: 4 forward, 4 + one K = 4T backward; square: 2 forward, 2 + one K = 2T).

TFLOP/s are the floor's GEMM FLOPs (useful work: 2 T d m per GEMM unit) over the time, so a
recomputing backward (``--no-save-activations``) shows up as lower TFLOP/s, not higher.
Writes ``kernels-<variant>-<dtype>-<device>-<date>.json`` and a ``.md`` table to ``out_dir``.

Without a GPU nothing is timed: a correctness sweep runs the kernels under the Triton
interpreter (in a subprocess, since ``TRITON_INTERPRET`` must be set before the kernels are
imported), prints the errors against the float64 reference and writes them to JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from wbscale.config import ModelConfig
from wbscale.provenance import cuda_version, git_commit, package_versions

__all__ = ["bench_kernels", "correctness_sweep", "failed_correctness", "gemm_units"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("eager", "compile", "triton", "floor")
MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)
ETA = LAM = 0.1
# The CPU sweep runs the interpreter (Python per program): only shapes this small are sane.
_CPU_MAX_TOKENS, _CPU_MAX_D = 256, 64
_CPU_DEFAULT_TOKENS, _CPU_DEFAULT_DIMS = (17, 64), (16, 32)


def gemm_units(variant: str) -> dict[str, int]:
    """GEMMs of size (T x d) x (d x m) per pass; the K = nT weight-gradient GEMM counts n."""
    fwd, bwd = (4, 8) if variant == "overcomplete" else (2, 4)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def dictionary_size(variant: str, d: int, expansion: int = ModelConfig.ista_expansion) -> int:
    """Atoms m of the benchmarked dictionary: the model's rule (``model.ista_expansion x d``
    overcomplete, ``d`` square; :func:`wbscale.models.crate.ista_atoms`)."""
    from wbscale.models.crate import ista_atoms

    return ista_atoms(ModelConfig(n_embd=d, ista_variant=variant, ista_expansion=expansion))


# --------------------------------------------------------------------------------------
# Correctness (any device; the CPU path needs the Triton interpreter)
# --------------------------------------------------------------------------------------


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error."""
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def ista_on_active_set(
    x: torch.Tensor,
    w: torch.Tensor,
    variant: str,
    eta: float,
    lam: float,
    masks: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block with every ReLU replaced by a fixed 0/1 mask: the linear piece the kernel chose.

    In bf16 a few pre-activations within rounding of zero land on the other side of the ReLU
    than in float64, which changes the gradient by O(1) there; gradients are only comparable
    on the same active set, so the float64 gradient of this function is the yardstick.
    """
    if variant == "overcomplete":
        m1, m2 = masks
        z1 = (eta * (x @ w.t()) - eta * lam) * m1
        z2 = (z1 + eta * ((x - z1 @ w) @ w.t()) - eta * lam) * m2
        return z2 @ w, z2
    (m,) = masks
    out = (x + eta * ((x - x @ w.t()) @ w) - eta * lam) * m
    return out, out


def _grads(fn: Callable, x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    y, z = fn(xr, wr)
    (y.double() * gy).sum().backward()
    return [y.detach(), z.detach(), xr.grad, wr.grad]


SWEEP_TOLERANCE = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2e-2}


def correctness_sweep(
    variant: str,
    dtype: str,
    tokens: Sequence[int],
    dims: Sequence[int],
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Norm-wise relative errors of the Triton kernels against float64, per shape.

    Inputs are rounded to ``dtype`` first, so only the kernels' own rounding counts. Output
    and code are compared with the float64 reference, gradients with the float64 gradient on
    the kernel's own active set (:func:`ista_on_active_set`); ``mask_flips`` is the fraction
    of code entries whose zero/non-zero state differs from float64. Eager in ``dtype`` is
    reported next to it (``*_eager``, plain float64 reference) for scale.
    """
    from wbscale.kernels import reference
    from wbscale.kernels.ista_triton import forward_codes, ista_triton

    ref_fn = getattr(reference, f"ista_{variant}_reference")
    lo = DTYPES[dtype]
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for t in tokens:
        for d in dims:
            m = dictionary_size(variant, d)
            x = torch.randn(t, d, generator=gen, dtype=torch.float64).to(lo).double().to(device)
            w = (
                (torch.randn(m, d, generator=gen, dtype=torch.float64) / d**0.5)
                .to(lo)
                .double()
                .to(device)
            )
            gy = torch.randn(t, d, generator=gen, dtype=torch.float64).to(device)
            ref = _grads(lambda a, b: ref_fn(a, b, ETA, LAM, True), x, w, gy)
            eager = _grads(lambda a, b: ref_fn(a.to(lo), b.to(lo), ETA, LAM, True), x, w, gy)
            kern = _grads(
                lambda a, b: ista_triton(
                    a.to(lo), b.to(lo), variant=variant, eta=ETA, lam=LAM, return_code=True
                ),
                x,
                w,
                gy,
            )
            masks = [
                (c > 0).double()
                for c in forward_codes(x.to(lo), w.to(lo), variant=variant, eta=ETA, lam=LAM)
            ]
            on_set = _grads(
                lambda a, b, k=masks: ista_on_active_set(a, b, variant, ETA, LAM, k), x, w, gy
            )
            row: dict[str, Any] = {"tokens": t, "d": d, "m": m}
            yardsticks = (ref[0], ref[1], on_set[2], on_set[3])
            for i, name in enumerate(("y", "code", "grad_x", "grad_w")):
                row[f"{name}_err"] = _rel_err(kern[i], yardsticks[i])
                row[f"{name}_err_eager"] = _rel_err(eager[i], ref[i])
            row["mask_flips"] = float(((kern[1] > 0) != (ref[1] > 0)).double().mean())
            tol = SWEEP_TOLERANCE[dtype]
            errs = [row[f"{n}_err"] for n in ("y", "code", "grad_x", "grad_w")]
            row["ok"] = bool(max(errs) <= tol and row["mask_flips"] <= 0.05)
            rows.append(row)
    return rows


def _cpu_sweep(variant: str, dtype: str, tokens: Sequence[int], dims: Sequence[int]) -> list[dict]:
    """Run :func:`correctness_sweep` under the interpreter, in this process if it already is."""
    kernels_mod = sys.modules.get("wbscale.kernels.ista_triton")
    if kernels_mod is not None and getattr(kernels_mod, "_INTERPRET", False):
        return correctness_sweep(variant, dtype, tokens, dims)
    code = (
        "import json, sys; from wbscale.bench.kernels import correctness_sweep; "
        "a = json.loads(sys.argv[1]); "
        "print(json.dumps(correctness_sweep(a['variant'], a['dtype'], a['tokens'], a['dims'])))"
    )
    arg = json.dumps(
        {"variant": variant, "dtype": dtype, "tokens": list(tokens), "dims": list(dims)}
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"CPU correctness sweep failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Timing (CUDA)
# --------------------------------------------------------------------------------------


def _impl(name: str, variant: str, save_activations: bool) -> Callable:
    from wbscale.kernels import reference
    from wbscale.kernels.ista_triton import ista_triton

    ref_fn = getattr(reference, f"ista_{variant}_reference")
    if name == "eager":
        return lambda x, w: ref_fn(x, w, ETA, LAM)
    if name == "compile":
        torch._dynamo.reset()  # one compiled graph per shape; never hit the recompile limit
        compiled = torch.compile(ref_fn, dynamic=False)
        return lambda x, w: compiled(x, w, ETA, LAM)
    return lambda x, w: ista_triton(
        x, w, variant=variant, eta=ETA, lam=LAM, save_activations=save_activations
    )


def _floor(
    variant: str, x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor
) -> tuple[Callable, Callable]:
    """The block's GEMMs with torch.matmul, operands prepared outside the timed region."""
    t, m = x.shape[0], w.shape[0]
    wt = w.t()
    code = torch.randn(t, m, device=x.device, dtype=x.dtype)
    n_seg = 4 if variant == "overcomplete" else 2
    seg_a = torch.randn(n_seg * t, m, device=x.device, dtype=x.dtype)
    seg_b = torch.randn(n_seg * t, x.shape[1], device=x.device, dtype=x.dtype)

    if variant == "overcomplete":

        def fwd() -> None:
            x @ wt, code @ w, x @ wt, code @ w

        def bwd() -> None:
            gy @ wt, code @ w, gy @ wt, code @ w, seg_a.t() @ seg_b

    else:

        def fwd() -> None:
            x @ wt, x @ w

        def bwd() -> None:
            gy @ wt, gy @ w, seg_a.t() @ seg_b

    return fwd, bwd


def _time(fn: Callable, grad_to_none: list[torch.Tensor] | None = None) -> list[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=list(QUANTILES)))


def _mb(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 2)


def _measure(
    impl: str,
    variant: str,
    dtype: torch.dtype,
    t: int,
    d: int,
    save_activations: bool,
    timer: Callable = _time,
    device: str = "cuda",
) -> dict[str, Any]:
    """One row: times per mode (ms quantiles), TFLOP/s, memory held after fwd and peak.

    ``timer(fn, grad_to_none) -> [median, p20, p80]``; ``device`` other than CUDA only to
    exercise this code without a GPU (no memory figures then).
    """
    dev = torch.device(device)
    m = dictionary_size(variant, d)
    x = torch.randn(t, d, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(m, d, device=dev, dtype=dtype) / d**0.5).requires_grad_()
    gy = torch.randn(t, d, device=dev, dtype=dtype)
    row: dict[str, Any] = {"impl": impl, "tokens": t, "d": d, "m": m}
    if impl == "floor":
        fwd, bwd = _floor(variant, x.detach(), w.detach(), gy)
        times = {
            "fwd": timer(fwd, None),
            "bwd": timer(bwd, None),
            "fwd+bwd": timer(lambda: (fwd(), bwd()), None),
        }
        memory = _memory(lambda: (fwd(), bwd()), None, dev.type == "cuda")
    else:
        fn = _impl(impl, variant, save_activations)
        fn(x, w).backward(gy)  # compile / autotune outside the timed region
        y = fn(x, w)
        times = {
            "fwd": timer(lambda: fn(x, w), [x, w]),
            "bwd": timer(lambda: y.backward(gy, retain_graph=True), [x, w]),
            "fwd+bwd": timer(lambda: fn(x, w).backward(gy), [x, w]),
        }
        del y
        x.grad = w.grad = None  # the peak then includes allocating the gradients
        memory = _memory(lambda: fn(x, w), gy, dev.type == "cuda")
    flops_unit = 2 * t * d * m
    units = gemm_units(variant)
    for mode in MODES:
        med, p20, p80 = times[mode]
        row[f"{mode}_ms"] = {"median": med, "p20": p20, "p80": p80}
        row[f"{mode}_tflops"] = units[mode] * flops_unit / (med * 1e-3) / 1e12
    row.update(memory)
    return row


def _memory(forward: Callable, gy: torch.Tensor | None, cuda: bool) -> dict[str, float | None]:
    """Memory held by the forward's outputs+saved tensors, and the fwd+bwd peak, over baseline."""
    if not cuda:
        return {"held_after_fwd_mb": None, "peak_mb": None}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    if gy is not None:
        out.backward(gy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return {"held_after_fwd_mb": _mb(held), "peak_mb": _mb(peak)}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def kernel_versions() -> dict[str, str | None]:
    """What a kernel benchmark depends on: torch, triton, Python (:mod:`wbscale.provenance`) and CUDA."""
    return {**package_versions(("torch", "triton")), "cuda": cuda_version()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _markdown(report: dict[str, Any]) -> str:
    """Speed table (speedups = other / triton; vs floor <= 1 means slower than the floor)."""
    lines = [
        f"# ISTA kernels: {report['variant']}, {report['dtype']}",
        "",
        f"{report['device']} · torch {report['versions']['torch']} · triton "
        f"{report['versions']['triton']} · {report['date']} · commit {report['git_commit'] or 'unknown'}"
        f" · save_activations={report['save_activations']}",
        "",
        "| tokens | d | pass | eager ms | compile ms | triton ms | floor ms | triton TFLOP/s "
        "| vs eager | vs compile | vs floor |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for row in report["rows"]:
        by_shape.setdefault((row["tokens"], row["d"]), {})[row["impl"]] = row

    def ms(row: dict | None, mode: str) -> float | None:
        if row is None or "error" in row:
            return None
        return row[f"{mode}_ms"]["median"]

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "—" if v is None else format(v, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or b is None else f"{a / b:.2f}x"

    for (t, d), impls in sorted(by_shape.items()):
        for mode in MODES:
            e, c, k, f = (ms(impls.get(i), mode) for i in IMPLS)
            tri = impls.get("triton")
            tflops = tri[f"{mode}_tflops"] if tri and "error" not in tri else None
            lines.append(
                f"| {t} | {d} | {mode} | {fmt(e)} | {fmt(c)} | {fmt(k)} | {fmt(f)} | {fmt(tflops, '.1f')} "
                f"| {ratio(e, k)} | {ratio(c, k)} | {ratio(f, k)} |"
            )
    lines += [
        "",
        "Memory over the inputs (MiB): held after forward (outputs + saved for backward) / fwd+bwd peak.",
        "",
        "| tokens | d | eager | compile | triton | triton / eager (peak) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (t, d), impls in sorted(by_shape.items()):
        cells = []
        for i in ("eager", "compile", "triton"):
            r = impls.get(i)
            cells.append(
                "—"
                if r is None or "error" in r
                else f"{r['held_after_fwd_mb']:.0f} / {r['peak_mb']:.0f}"
            )
        e, k = impls.get("eager"), impls.get("triton")
        peak_ratio = (
            f"{k['peak_mb'] / e['peak_mb']:.2f}"
            if e and k and "error" not in e and "error" not in k and e["peak_mb"]
            else "—"
        )
        lines.append(f"| {t} | {d} | {' | '.join(cells)} | {peak_ratio} |")
    errors = [r for r in report["rows"] if "error" in r]
    if errors:
        lines += [
            "",
            "Not measured: "
            + "; ".join(f"{r['impl']} T={r['tokens']} d={r['d']}: {r['error']}" for r in errors),
        ]
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out_dir: Path, stem: str, markdown: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown:
        path.with_suffix(".md").write_text(_markdown(report))
    return path


def bench_kernels(
    variant: str = "overcomplete",
    dtype: str = "bf16",
    tokens: Sequence[int] = (4096, 16384, 65536),
    dims: Sequence[int] = (512, 768, 1024, 1600),
    out_dir: Path = Path("bench/results"),
    save_activations: bool = True,
) -> Path:
    """Benchmark (CUDA) or correctness-check (CPU, no timings) the ISTA kernels; returns the JSON path."""
    if variant not in ("overcomplete", "square"):
        raise ValueError(f"unknown ISTA variant {variant!r}; choose overcomplete or square")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    now = _dt.datetime.now(_dt.timezone.utc)
    report: dict[str, Any] = {
        "variant": variant,
        "dtype": dtype,
        "save_activations": save_activations,
        "eta": ETA,
        "lam": LAM,
        "versions": kernel_versions(),
        "git_commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
    }
    if not torch.cuda.is_available():
        print(
            "No GPU present: no timings. Running a CPU correctness sweep under the Triton interpreter."
        )
        cpu_tokens = [t for t in tokens if t <= _CPU_MAX_TOKENS] or list(_CPU_DEFAULT_TOKENS)
        cpu_dims = [d for d in dims if d <= _CPU_MAX_D and d % 16 == 0] or list(_CPU_DEFAULT_DIMS)
        rows = _cpu_sweep(variant, dtype, cpu_tokens, cpu_dims)
        _print_sweep(rows)
        report.update(
            device="cpu (Triton interpreter, correctness only)", timings=None, correctness=rows
        )
        return _write(report, out_dir, f"kernels-{variant}-{dtype}-correctness-cpu", markdown=False)

    device_name = torch.cuda.get_device_name()
    report.update(
        device=device_name, correctness=correctness_sweep(variant, dtype, (257,), (64,), "cuda")
    )
    rows = []
    for t in tokens:
        for d in dims:
            for impl in IMPLS:
                try:
                    row = _measure(impl, variant, DTYPES[dtype], t, d, save_activations)
                except torch.cuda.OutOfMemoryError:
                    row = {
                        "impl": impl,
                        "tokens": t,
                        "d": d,
                        "m": dictionary_size(variant, d),
                        "error": "out of memory",
                    }
                torch.cuda.empty_cache()
                rows.append(row)
                print(_row_line(row), flush=True)
    report["rows"] = rows
    stem = f"kernels-{variant}-{dtype}-{_slug(device_name)}-{now:%Y%m%d-%H%M%S}"
    path = _write(report, out_dir, stem, markdown=True)
    print(path.with_suffix(".md").read_text())
    return path


def _row_line(row: dict[str, Any]) -> str:
    head = f"{row['impl']:>8} T={row['tokens']:<6} d={row['d']:<5}"
    if "error" in row:
        return f"{head} {row['error']}"
    return (
        head
        + " ".join(f" {mode} {row[f'{mode}_ms']['median']:.3f} ms" for mode in MODES)
        + f"  peak {row['peak_mb']} MiB"
    )


def _print_sweep(rows: list[dict[str, Any]]) -> None:
    print(
        "norm-wise relative error vs float64: triton (eager in the same dtype); grads on triton's active set"
    )
    for r in rows:
        errs = "  ".join(
            f"{n} {r[f'{n}_err']:.1e} ({r[f'{n}_err_eager']:.1e})"
            for n in ("y", "code", "grad_x", "grad_w")
        )
        flips = f"mask flips {100 * r['mask_flips']:.2f}%"
        print(
            f"T={r['tokens']:<4} d={r['d']:<3} {errs}  {flips}  {'ok' if r['ok'] else 'MISMATCH'}"
        )


def failed_correctness(path: Path) -> list[dict[str, Any]]:
    """The correctness rows of a written report that failed (``wbscale bench kernels`` exits 1 then)."""
    return [r for r in json.loads(Path(path).read_text())["correctness"] if not r["ok"]]
