"""``wbscale doctor``: what this machine can do for wbscale, one OK / WARN / FAIL line each.

FAIL is kept for what training cannot do without (Python, torch, Lightning, the data
packages, a writable runs folder with space in it): ``wbscale doctor`` exits 1 when any
check fails and 0 otherwise. Everything optional (a GPU, bf16, NCCL, Triton, DeepSpeed ops,
SLURM, a wandb key) is OK or WARN with what wbscale does without it.

Nothing here uses the network. Triton and DeepSpeed are probed in child processes: a
broken install (or DeepSpeed's import-time logging) cannot take this process down with it,
and Triton's interpreter switch (``TRITON_INTERPRET``) is read when a kernel is defined,
so the CPU probe needs a process of its own anyway.
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GB = 1e9
DISK_FAIL_GB = 1.0  # below this a checkpoint of even the demo model may not fit
DISK_WARN_GB = 20.0
PROBE_TIMEOUT = 180.0
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sacct", "scontrol")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str  # OK | WARN | FAIL
    name: str
    detail: str


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


# ---------------------------------------------------------------------------- checks


def check_python() -> Check:
    v = platform.python_version()
    if sys.version_info < (3, 10):  # noqa: UP036 - the check is for a wrong interpreter
        return Check(FAIL, "python", f"{v}: wbscale needs Python >= 3.10")
    return Check(OK, "python", f"{v} ({sys.executable})")


def check_wbscale() -> Check:
    from wbscale.provenance import commit_label as git_commit

    version = _version("wbscale") or "?"
    commit = git_commit()
    return Check(OK, "wbscale", f"{version}" + (f", commit {commit}" if commit else ""))


def check_torch() -> Check:
    try:
        import torch
    except Exception as err:
        return Check(FAIL, "torch", f"cannot import torch ({err}); install it: pip install torch")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    if getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    return Check(OK, "torch", f"{torch.__version__} ({build})")


def check_packages() -> list[Check]:
    """Lightning and the data/tracking stack; the first four are required to train."""
    required = ("lightning", "tokenizers", "numpy", "yaml", "safetensors")
    optional = {
        "datasets": "only `hf:` data sources need it",
        "matplotlib": "run plots and sweep reports need it",
        "wandb": "tracking falls back to metrics.jsonl only",
        "tqdm": "no progress bars",
    }
    checks = []
    found = {m: _version(m) for m in (*required, *optional)}
    missing = [m for m in required if found[m] is None]
    listed = ", ".join(f"{m} {found[m]}" for m in required if found[m])
    if missing:
        checks.append(Check(FAIL, "packages", f"missing {', '.join(missing)} (pip install -e .); found: {listed}"))
    else:
        checks.append(Check(OK, "packages", listed))
    for module, why in optional.items():
        if found[module] is None:
            checks.append(Check(WARN, module, f"not installed: {why}"))
    present = [f"{m} {found[m]}" for m in optional if found[m]]
    if present:
        checks.append(Check(OK, "optional", ", ".join(present)))
    return checks


def check_gpu() -> list[Check]:
    """GPU count and model, bf16, NCCL (or gloo on CPU)."""
    try:
        import torch
        import torch.distributed as dist
    except Exception:
        return []
    checks = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = {}
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            key = f"{p.name} ({p.total_memory / GB:.0f} GB, compute capability {p.major}.{p.minor})"
            names[key] = names.get(key, 0) + 1
        checks.append(Check(OK, "gpu", "; ".join(f"{c} x {k}" for k, c in names.items())))
        if torch.cuda.is_bf16_supported():
            checks.append(Check(OK, "bf16", "supported: precision auto trains in bf16-mixed"))
        else:
            checks.append(Check(WARN, "bf16", "not supported on this GPU: use train.precision: 16-mixed or 32"))
        if dist.is_nccl_available():
            try:
                version = ".".join(str(x) for x in torch.cuda.nccl.version())
            except Exception:
                version = "version unknown"
            checks.append(Check(OK, "nccl", f"{version}: multi-GPU DDP / DeepSpeed use it"))
        else:
            checks.append(Check(WARN, "nccl", "not available in this torch build: multi-GPU runs cannot start"))
        return checks
    hint = " (a CUDA build of torch: check the driver with nvidia-smi)" if torch.version.cuda else ""
    checks.append(Check(WARN, "gpu", f"no CUDA GPU visible{hint}: CPU training only (the tests and the demo need none)"))
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        ok = bool(((a @ a).float() == 4).all())
    except Exception:
        ok = False
    checks.append(Check(OK if ok else WARN, "bf16", ("CPU bf16 matmul works" if ok else "CPU bf16 matmul failed")
                        + "; CPU runs train in fp32 (precision auto)"))
    gloo = dist.is_gloo_available()
    checks.append(Check(OK if gloo else WARN, "nccl", "not used without a GPU; gloo "
                        + ("available: multi-process CPU runs (ddp, deepspeed) use it" if gloo
                           else "missing too: only single-process runs")))
    return checks


_TRITON_PROBE = """
import json, sys, torch
from wbscale.doctor import triton_probe
print(json.dumps(triton_probe(sys.argv[1])))
"""


def triton_probe(device: str) -> dict[str, object]:
    """Define, compile (or interpret) and run a tiny Triton kernel on ``device``."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    x = torch.arange(100, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    add_one[(2,)](x, out, 100, BLOCK=64)
    return {"ok": bool(torch.equal(out, x + 1)), "triton": triton.__version__}


def _child(code: str, args: list[str], env: dict[str, str]) -> tuple[dict | None, str]:
    """Run ``python -c code args`` and parse the last stdout line as JSON."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=PROBE_TIMEOUT, env=env,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {PROBE_TIMEOUT:.0f}s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except json.JSONDecodeError:
            pass
    err = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    return None, err[-1] if err else f"exit status {proc.returncode}"


def check_triton() -> Check:
    if _version("triton") is None:
        return Check(WARN, "triton", "not installed: the ISTA kernel runs eager (model.ista_kernel: eager)")
    import torch

    env = dict(os.environ)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
        result, err = _child(_TRITON_PROBE, ["cuda"], env)
        if result and result.get("ok"):
            return Check(OK, "triton", f"{result['triton']}: compiles and runs a kernel on the GPU (fused ISTA available)")
        return Check(WARN, "triton", f"cannot compile a kernel ({err or 'wrong result'}): use model.ista_kernel: eager or compile")
    env["TRITON_INTERPRET"] = "1"
    result, err = _child(_TRITON_PROBE, ["cpu"], env)
    if result and result.get("ok"):
        return Check(OK, "triton", f"{result['triton']}: no GPU to compile for; the interpreter (TRITON_INTERPRET=1) "
                     "runs kernels on CPU, as the kernel tests do")
    return Check(WARN, "triton", f"interpreter failed ({err or 'wrong result'}): kernel tests will fail; CPU training uses eager ISTA")


_DEEPSPEED_PROBE = """
import json, logging
logging.disable(logging.WARNING)
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS
from deepspeed.ops.op_builder.builder import probe_is_compatible
from torch.utils.cpp_extension import is_ninja_available
ops = {}
for name, builder in ALL_OPS.items():
    if name == "deepspeed_not_implemented":  # a placeholder builder, not an op
        continue
    try:
        ops[name] = {"installed": bool(installed_ops.get(name)), "compatible": bool(probe_is_compatible(builder, False))}
    except Exception:
        ops[name] = {"installed": False, "compatible": False}
print(json.dumps({"version": deepspeed.__version__, "accelerator": get_accelerator()._name,
                  "ninja": is_ninja_available(), "ops": ops}))
"""


def check_deepspeed() -> list[Check]:
    if _version_spec("deepspeed") is None:
        return [Check(WARN, "deepspeed", "not installed: distributed.strategy: deepspeed (ZeRO) unavailable; auto/ddp work")]
    result, err = _child(_DEEPSPEED_PROBE, [], dict(os.environ))
    if result is None:
        return [Check(WARN, "deepspeed", f"installed but does not import ({err}): ZeRO strategies unavailable")]
    ops = result["ops"]
    prebuilt = sorted(n for n, o in ops.items() if o["installed"])
    jit = sorted(n for n, o in ops.items() if o["compatible"] and not o["installed"])
    checks = [Check(OK, "deepspeed", f"{result['version']}, accelerator {result['accelerator']}; ops prebuilt: "
                    f"{', '.join(prebuilt) or 'none'}; JIT-compilable: {', '.join(jit) or 'none'}"
                    + ("" if result["ninja"] else " (ninja missing: no JIT builds)"))]
    adam = ops.get("cpu_adam", {})
    if adam.get("installed") or (adam.get("compatible") and result["ninja"]):
        how = "prebuilt" if adam.get("installed") else "compiles on first use (~1 min, then cached)"
        checks.append(Check(OK, "cpu_adam", f"{how}: optimizer offload uses DeepSpeed's CPU Adam"))
    else:
        checks.append(Check(WARN, "cpu_adam", "unavailable: optimizer offload falls back to torch AdamW on CPU (slower)"))
    return checks


def _version_spec(module: str) -> object | None:
    """Whether a module is importable, without importing it (DeepSpeed's import is slow)."""
    import importlib.util

    return importlib.util.find_spec(module)


def check_slurm() -> Check:
    found = {c: shutil.which(c) for c in SLURM_COMMANDS}
    have = [c for c, p in found.items() if p]
    if len(have) == len(SLURM_COMMANDS):
        return Check(OK, "slurm", f"{', '.join(SLURM_COMMANDS)} on PATH ({Path(found['sbatch']).parent}): wbscale slurm works")
    if not have:
        return Check(WARN, "slurm", "no SLURM commands on PATH: not a login node; `wbscale slurm` and `sweep --slurm` "
                     "are unavailable (local runs are not affected)")
    missing = [c for c in SLURM_COMMANDS if c not in have]
    return Check(WARN, "slurm", f"found {', '.join(have)} but not {', '.join(missing)}: `wbscale slurm` may fail")


def check_wandb() -> Check:
    """Whether runs will log online: a key in WANDB_API_KEY or ~/.netrc. No network call."""
    if _version_spec("wandb") is None:
        return Check(WARN, "wandb", "not installed: no wandb tracking (metrics.jsonl still written)")
    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled", "dryrun"):
        return Check(OK, "wandb", f"WANDB_MODE={mode}: runs log {'offline' if mode != 'disabled' else 'nothing'} to wandb")
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    source = None
    if os.environ.get("WANDB_API_KEY"):
        source = "WANDB_API_KEY"
    else:
        path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        try:
            if path.is_file() and netrc.netrc(path).authenticators(host):
                source = str(path)
        except (netrc.NetrcParseError, OSError):
            pass
    if source:
        return Check(OK, "wandb", f"a key for {host} is configured ({source}): tracking.wandb.mode auto logs online")
    return Check(WARN, "wandb", f"no key for {host} (WANDB_API_KEY or ~/.netrc): runs log offline; "
                 "`wandb login`, then `wandb sync runs/<run>/wandb/offline-run-*` uploads them")


def check_disk(runs_dir: Path) -> Check:
    probe = Path(runs_dir).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free = usage.free / GB
    where = f"{runs_dir} ({'exists' if Path(runs_dir).exists() else f'to be created under {probe}'})"
    if not os.access(probe, os.W_OK):
        return Check(FAIL, "disk", f"{where}: not writable; set train.runs_dir to a writable folder")
    if free < DISK_FAIL_GB:
        return Check(FAIL, "disk", f"{where}: {free:.1f} GB free of {usage.total / GB:.0f} GB: too little for checkpoints")
    status = WARN if free < DISK_WARN_GB else OK
    extra = "; GPT-2-scale checkpoints (with optimizer state) take 2-20 GB each" if status == WARN else ""
    return Check(status, "disk", f"{where}: {free:.1f} GB free of {usage.total / GB:.0f} GB{extra}")


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = float(value.split()[0]) * 1024
    except OSError:
        pass
    if "MemTotal" not in out:
        try:
            out["MemTotal"] = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            pass
    return out


def check_host() -> Check:
    from wbscale.provenance import cpu_model

    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    mem = _meminfo()
    memory = ""
    if "MemTotal" in mem:
        memory = f", {mem['MemTotal'] / GB:.1f} GB RAM"
        if "MemAvailable" in mem:
            memory += f" ({mem['MemAvailable'] / GB:.1f} GB available)"
    status = WARN if mem.get("MemAvailable", 1e12) < 4 * GB else OK
    return Check(status, "host", f"{cpu_model()}: {usable} of {cores} CPU cores usable{memory}"
                 + ("; under 4 GB free: data preparation and CPU runs may swap" if status == WARN else ""))


# ---------------------------------------------------------------------------- report


def run_checks(runs_dir: str | Path = "runs") -> list[Check]:
    """Every check, in report order."""
    checks = [check_python(), check_wbscale(), check_torch()]
    if checks[-1].status == FAIL:
        return [*checks, *check_packages(), check_disk(Path(runs_dir)), check_host()]
    checks += check_packages()
    checks += check_gpu()
    checks.append(check_triton())
    checks += check_deepspeed()
    checks.append(check_slurm())
    checks.append(check_wandb())
    checks.append(check_disk(Path(runs_dir)))
    checks.append(check_host())
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    verdict = "ready" if not counts[FAIL] else "NOT ready: fix the FAIL lines"
    lines.append(f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL: {verdict}")
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """1 when something required is broken, else 0 (warnings do not fail)."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def checks_json(checks: list[Check]) -> str:
    return json.dumps({"checks": [asdict(c) for c in checks], "exit_code": exit_code(checks)}, indent=2)
