"""Typed recipe: one YAML file -> nested dataclasses, validated, with ``--set`` overrides.

A recipe is the single source of truth for a run. ``load_recipe`` reads it, applies
``a.b=c`` overrides, checks every key and value, and returns a :class:`Recipe`; the
resolved recipe is saved next to every run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from wbscale.errors import UserError, did_you_mean

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout (git provenance); not the install
# The shipped recipes: recipes/ in a checkout, wbscale/recipes/ in an installed wheel.
RECIPES_DIR = Path(str(importlib.resources.files("wbscale.recipes")))


@dataclass
class ModelConfig:
    """Architecture. ``arch`` picks the model class; sizes follow nanoGPT's names."""

    arch: Literal["crate", "gpt2"] = "crate"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 0  # 0: take it from the prepared tokenizer
    dropout: float = 0.0
    # CRATE ISTA block (docs/architecture.md): overcomplete = 4x dictionary, two steps, output D z2
    ista_variant: Literal["overcomplete", "square"] = "overcomplete"
    ista_expansion: int = 4
    ista_eta: float = 0.1
    ista_lambda: float = 0.1
    ista_kernel: Literal["auto", "triton", "eager", "compile"] = "auto"
    # Triton kernel only: keep (z1, u, z2) for backward (fast) or recompute them from x
    # (+3 GEMMs, saves ~3 T x m activations per layer).
    # what the ISTA kernel keeps for backward: true = "all" codes, false = "x" only (recompute,
    # +3 GEMMs), "x_u" = x and u (recompute z1, z2: +2 GEMMs, ~0.2x eager's activation memory)
    ista_save_activations: bool | Literal["all", "x_u", "x"] = True
    # CRATE block options (docs/architecture.md, "CRATE block options"); every default is the
    # published CRATE LM. residual: x + ISTA(LN2(x)) instead of ISTA(LN2(x)) (CRATE-alpha).
    ista_residual: bool = False
    # tied: one dictionary W encodes and decodes (published); separate: the ISTA steps use W,
    # the output is z W_out with its own W_out (m x d) (CRATE-alpha's decoupled dictionary)
    ista_decoder: Literal["tied", "separate"] = "tied"
    ista_learn_lambda: bool = False  # a learned threshold per atom, initialised to ista_lambda
    ista_learn_eta: bool = False  # a learned scalar step size per layer, initialised to ista_eta
    ista_steps: int | None = None  # ISTA iterations; None: the published count (overcomplete 2, square 1)
    ista_init_scale: float | None = None  # dictionary init: None = kaiming-uniform (published), x = N(0, x)
    # Rotary position embedding (base 10000) of the attention's queries and keys, on top of
    # the learned absolute positions, so a head's scores depend on i - j. CRATE: the query and
    # key copies of MSSA's W_k = X U_k are rotated, the value stays W_k (off = the published
    # MSSA, scores <U x_i, U x_j>, largest for j = i). GPT-2: q and k are rotated (the control
    # that separates RoPE's gain from CRATE's).
    rope: bool = False
    # GPT-2 baseline: a hub id or local folder with HF GPT-2 safetensors to start from
    pretrained: str | None = None


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token shards."""

    # synthetic-stories | hf:<dataset name> | path to a .txt / .jsonl / .parquet file or folder
    source: str = "synthetic-stories"
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    separator: str = "<|endoftext|>"  # document separator for .txt sources
    max_documents: int | None = None  # cap on documents read (None: all)
    synthetic_documents: int = 20000
    # "bpe" trains a byte-level BPE of vocab_size tokens on the training text; "char" makes
    # one token per character of the training text (sorted; + <|endoftext|> and <|unk|>;
    # vocab_size is then ignored); otherwise a path to a tokenizer.json
    tokenizer: str = "bpe"
    vocab_size: int = 2048
    # train/val split (wbscale.data.sources): documents = whole documents, seeded sampling;
    # position = the last val_fraction of the text (nanoGPT's split of one book);
    # auto = position for a local source that gives a single document, documents otherwise
    split: Literal["auto", "documents", "position"] = "auto"
    val_fraction: float = 0.02
    shard_tokens: int = 10_000_000
    out_dir: str = "data/synthetic-stories"
    workers: int = 0  # 0: one per CPU core
    seed: int = 1337


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr``."""

    max_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    """The training loop: steps, batches, precision, evaluation, checkpoints."""

    run_name: str = "demo"
    runs_dir: str = "runs"
    max_steps: int = 1000
    micro_batch_size: int = 16
    grad_accum: int = 1
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    compile: bool = False
    # LM head + cross-entropy this many tokens at a time, never holding the full (tokens x
    # vocab) fp32 logits (wbscale.models.loss); 0 = the full logits (exact on CPU as before)
    loss_chunk: int = 0
    seed: int = 1337
    deterministic: bool = True
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 20
    ckpt_every: int = 100
    keep_last: int = 3
    # Stop cleanly (after a checkpoint) once the step is a multiple of this; 0 = never.
    # For time-sliced allocations, and how the tests interrupt a run to resume it.
    exit_interval: int = 0
    sample_every: int = 0  # 0: samples at the end of training only
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    sample_max_new_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    sample_top_p: float = 1.0  # nucleus sampling; 1 = off


@dataclass
class WandbConfig:
    """wandb run settings; ``auto`` is online with a key, offline without."""

    project: str = "wbscale"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class TrackingConfig:
    """Run tracking: wandb plus the white-box metrics cadence."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    metrics_every: int = 100


@dataclass
class DistributedConfig:
    """How the run is spread over processes and machines."""

    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = 1
    nodes: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)
    # Collective timeout (seconds) of the process group: a rank that hangs (stopped,
    # deadlocked, a dead node) makes the others fail after this long instead of 30 min.
    timeout_s: int = 600


@dataclass
class SlurmConfig:
    """Preemption under SLURM (wbscale.slurm): the warning signal and what it triggers.

    ``wbscale slurm submit`` asks SLURM for ``signal`` ``grace_seconds`` before the time
    limit; on it the run saves a checkpoint at the next step boundary and requeues itself.
    """

    signal: Literal["USR1", "TERM"] = "USR1"
    grace_seconds: int = 90
    requeue: bool = True
    # The requeue signal: auto/on handled (requeue inside SLURM, else checkpoint + exit 75);
    # off: left alone. SIGTERM / SIGINT always checkpoint at the next step and stop.
    preemption: Literal["auto", "on", "off"] = "auto"


@dataclass
class BIMTPhase:
    """From ``start`` (a fraction of ``train.max_steps``) on, the connection cost is weighted by ``lam``."""

    start: float = 0.0
    lam: float = 1e-3


@dataclass
class BIMTToyConfig:
    """``wbscale bimt toy``: a small MLP on a task of the BIMT paper, plain PyTorch loop, CPU."""

    task: Literal["two-moons", "independence"] = "two-moons"
    hidden: list[int] = field(default_factory=lambda: [20, 20])
    steps: int = 10000
    lr: float = 2e-3
    train_samples: int = 200
    test_samples: int = 1000
    noise: float = 0.1  # two-moons: std of the Gaussian noise on the points
    float64: bool = True
    seed: int = 0
    baseline: bool = True  # also train the same MLP plainly (no cost, no swaps) to compare
    out_dir: str = "runs/bimt-toy"


@dataclass
class BIMTConfig:
    """Brain-inspired modular training (Liu, Gan & Tegmark 2023) as a fine-tuning callback.

    Neurons sit on [0, 1] at (i + 0.5) / n; the connection cost of the selected linear maps
    is ``sum |w| (locality * |x_i - x_j| + layer_distance)``; every ``swap_every`` steps the
    ``swap_top_k`` heaviest units of each swappable layer move to the place that lowers it
    most (docs/bimt.md).
    """

    enabled: bool = False
    locality: float = 1.0  # A: weight of the horizontal distance; 0 = plain L1
    layer_distance: float = 0.1  # l0: distance between consecutive layers
    # sum: lam is a per-weight strength (like weight decay, independent of model size);
    # mean: the cost is divided by the number of weights in it
    reduction: Literal["sum", "mean"] = "sum"
    lambda_phases: list[BIMTPhase] = field(default_factory=lambda: [BIMTPhase(0.0, 1e-3)])
    bias_penalty: bool = False  # also penalise |b| * layer_distance for the maps' biases
    # linear maps in the cost: hidden = GPT-2 MLP c_fc/c_proj or the CRATE ISTA dictionary;
    # attention = c_attn/c_proj; embeddings = the token embedding (= tied LM head)
    maps: list[Literal["hidden", "attention", "embeddings"]] = field(default_factory=lambda: ["hidden", "attention"])
    # units that swap places: hidden = MLP neurons / ISTA atoms, heads = attention heads as
    # blocks, residual = residual-stream dimensions jointly across all layers
    units: list[Literal["hidden", "heads", "residual"]] = field(default_factory=lambda: ["hidden", "heads", "residual"])
    swap_every: int = 200  # optimizer steps between swap rounds; 0: no swaps
    swap_top_k: int = 32
    prune_threshold: float = 1e-2  # end of training: |w| below this is set to 0 (export only)
    mass_radius: float = 0.1  # metric: fraction of |w| on connections no longer than this
    metrics_every: int = 0  # 0: every train.log_every steps
    export_pruned: bool = True  # write runs/<run>/bimt-pruned/ (inference folder) at the end
    # start from these weights (inference folder, training checkpoint or run folder) unless
    # resuming; how a CRATE checkpoint is fine-tuned (model.pretrained is GPT-2 only)
    init_from: str | None = None
    toy: BIMTToyConfig = field(default_factory=BIMTToyConfig)


@dataclass
class Recipe:
    """A complete run description."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    bimt: BIMTConfig = field(default_factory=BIMTConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.runs_dir) / self.train.run_name


# ---------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the obvious cases."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: the word meant
            words = ("true", "yes", "on", "y") if value else ("false", "no", "off", "n")
            meant = [c for c in choices if isinstance(c, str) and c.lower() in words]
            if len(meant) == 1:
                return meant[0]
        raise UserError(
            f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            + did_you_mean(str(value), [str(c) for c in choices])
        )
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            raise UserError(
                f"{where}: expected a string, got nothing (YAML reads an empty value, ~ and null as "
                "no value): quote it, e.g. separator: \"\\n\" in a recipe, or --set 'data.separator=\\n\\n'"
            )
        raise UserError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug, not a user error


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = [f"{where}.{k}" if where else k for k in fields]
            raise UserError(f"unknown key '{dotted}'" + did_you_mean(dotted, known))
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``["a.b=c", ...]``.

    A value for a text field (``str``, a choice of words such as ``slurm.preemption``, or a
    list of them) is the text as typed, not YAML: ``--set slurm.preemption=on`` is the word
    ``on``, ``--set data.separator=$'\\n'`` a newline. In it the escapes ``\\n``, ``\\t``,
    ``\\r``, ``\\0``, ``\\\\`` (a backslash), ``\\xHH`` and ``\\uXXXX`` are decoded
    (``--set 'data.separator=\\n\\n'``: a blank line); a value in quotes is read as a YAML
    string (``--set 'data.separator="\\n\\n"'``); ``null`` or ``~`` gives an optional one no
    value; a list is a YAML ``[a, b]`` or one item. Every other value is read as YAML
    (``3``, ``3e-4``, ``true``, ``[1, 2]``, ``null``).
    """
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.max_lr=3e-4")
        parsed.append((key.strip(), _override_value(key.strip(), raw)))
    return parsed


_NULLS = ("null", "Null", "NULL", "~")
_ESCAPE = re.compile(r"\\(?:([ntr0\\])|x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4}))")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}


def decode_escapes(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r``, ``\\0``, ``\\\\``, ``\\xHH``, ``\\uXXXX`` -> the characters; other backslashes stay."""
    return _ESCAPE.sub(
        lambda m: _SIMPLE_ESCAPES[m.group(1)] if m.group(1) else chr(int(m.group(2) or m.group(3), 16)), text
    )


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _annotation(dotted: str) -> Any:
    """The type of recipe key ``a.b.c``; None when there is no such key (reported later)."""
    tp: Any = Recipe
    for key in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = _hints(tp).get(key)
    return tp


def _is_text(tp: Any) -> bool:
    return tp is str or (get_origin(tp) is Literal and all(isinstance(c, str) for c in get_args(tp)))


def _override_value(key: str, raw: str) -> Any:
    tp, optional = _annotation(key), False
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        tp = args[0] if len(args) == 1 else None
    if _is_text(tp):
        return _text_value(raw, optional, word=tp is not str)
    if get_origin(tp) is list and _is_text(get_args(tp)[0]) and not raw.lstrip().startswith("["):
        return [_text_value(raw, False, word=get_args(tp)[0] is not str)]
    return _yaml_value(raw)


def _text_value(raw: str, optional: bool, word: bool) -> str | None:
    text = raw.strip() if word else raw  # a choice never has spaces; free text keeps them
    stripped = text.strip()
    if optional and stripped in _NULLS:
        return None
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        value = _yaml_value(stripped)
        if isinstance(value, str):
            return value
    return decode_escapes(text)


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Build and validate a recipe from a mapping plus ``a.b=c`` overrides."""
    data = _deepcopy(data or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    recipe = _build(Recipe, data, "")
    validate(recipe)
    return recipe


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a recipe under ``recipes/``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise UserError(
        f"recipe '{name_or_path}' not found: no such file and no recipes/{name_or_path}.yaml"
        + did_you_mean(name_or_path, known)
        + (f" (known recipes: {', '.join(known)})" if known else "")
    )


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (path or name under ``recipes/``) and apply overrides."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the recipe ({err.strerror})") from None
    if data is None:
        raise UserError(
            f"{path}: the recipe is empty; a recipe needs at least a model and a data section "
            "(see `wbscale recipes show demo` for a complete one)"
        )
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of sections (model:, data:, …), not a {type(data).__name__}")
    try:
        return recipe_from_dict(data, overrides)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from wbscale.io import atomic_write_text

    atomic_write_text(Path(path), recipe.to_yaml())


# ---------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def validate(r: Recipe) -> None:
    """Value checks that types alone cannot express."""
    m, d, o, t, dist = r.model, r.data, r.optim, r.train, r.distributed
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        _check(getattr(m, name) >= 1, f"model.{name} must be >= 1 (got {getattr(m, name)})")
    _check(
        m.n_embd % m.n_head == 0,
        f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})",
    )
    _check(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (got {m.vocab_size}); 0 = from tokenizer")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1) (got {m.dropout})")
    _check(m.ista_expansion >= 1, f"model.ista_expansion must be >= 1 (got {m.ista_expansion})")
    _check(m.ista_eta > 0, f"model.ista_eta must be > 0 (got {m.ista_eta})")
    _check(m.ista_lambda >= 0, f"model.ista_lambda must be >= 0 (got {m.ista_lambda})")
    _validate_ista_options(m)
    if d.tokenizer == "char":
        _check(
            d.vocab_size >= 257,
            f"data.vocab_size ({d.vocab_size}) is not used with data.tokenizer: char: the vocabulary is the "
            "training text's characters + <|endoftext|> + <|unk|>; leave data.vocab_size out",
        )
    else:
        _check(d.vocab_size >= 257, f"data.vocab_size must be >= 257 for byte-level BPE (got {d.vocab_size})")
    _check(0.0 < d.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5) (got {d.val_fraction})")
    _check(d.shard_tokens >= 1024, f"data.shard_tokens must be >= 1024 (got {d.shard_tokens})")
    _check(d.workers >= 0, f"data.workers must be >= 0 (got {d.workers})")
    _check(d.synthetic_documents >= 10, f"data.synthetic_documents must be >= 10 (got {d.synthetic_documents})")
    _check(o.max_lr > 0, f"optim.max_lr must be > 0 (got {o.max_lr})")
    _check(0 <= o.min_lr <= o.max_lr, f"optim.min_lr must be in [0, optim.max_lr] (got {o.min_lr})")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0 (got {o.warmup_steps})")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {o.weight_decay})")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _check(o.eps > 0, f"optim.eps must be > 0 (got {o.eps}); AdamW divides by sqrt(v) + eps")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (got {o.grad_clip}); 0 disables it")
    _check(t.run_name.strip() != "" and "/" not in t.run_name, f"train.run_name must be a plain name (got {t.run_name!r})")
    for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "val_every", "val_batches", "ckpt_every", "keep_last"):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1 (got {getattr(t, name)})")
    _check(t.loss_chunk >= 0, f"train.loss_chunk must be >= 0 (got {t.loss_chunk}); 0 = the full logits")
    _check(t.exit_interval >= 0, f"train.exit_interval must be >= 0 (got {t.exit_interval}); 0 = never")
    _check(t.sample_every >= 0, f"train.sample_every must be >= 0 (got {t.sample_every})")
    _check(t.sample_max_new_tokens >= 0, "train.sample_max_new_tokens must be >= 0")
    _check(t.sample_temperature > 0, f"train.sample_temperature must be > 0 (got {t.sample_temperature})")
    _check(t.sample_top_k >= 0, f"train.sample_top_k must be >= 0 (got {t.sample_top_k}); 0 = no top-k filtering")
    _check(0 < t.sample_top_p <= 1, f"train.sample_top_p must be in (0, 1] (got {t.sample_top_p}); 1 = off")
    _check(r.tracking.metrics_every >= 0, "tracking.metrics_every must be >= 0 (0 disables)")
    _check(dist.zero_stage in (1, 2, 3), f"distributed.zero_stage must be 1, 2 or 3 (got {dist.zero_stage})")
    _check(dist.devices >= 1 and dist.nodes >= 1, "distributed.devices and distributed.nodes must be >= 1")
    _check(dist.timeout_s >= 10, f"distributed.timeout_s must be >= 10 seconds (got {dist.timeout_s})")
    _check(r.slurm.grace_seconds >= 1, f"slurm.grace_seconds must be >= 1 (got {r.slurm.grace_seconds})")
    if m.pretrained is not None:
        _check(m.arch == "gpt2", "model.pretrained is only supported for model.arch: gpt2")
    _validate_bimt(r)


def _validate_ista_options(m: ModelConfig) -> None:
    """The CRATE block options (ModelConfig.ista_residual ... ista_init_scale) and model.rope."""
    if m.rope:
        _check(
            (m.n_embd // m.n_head) % 2 == 0,
            f"model.rope rotates pairs of head dimensions: model.n_embd / model.n_head must be even "
            f"(got {m.n_embd // m.n_head})",
        )
    if m.ista_steps is not None:
        _check(m.ista_steps >= 1, f"model.ista_steps must be >= 1 (got {m.ista_steps}); null = the published count")
    if m.ista_init_scale is not None:
        _check(
            0 < m.ista_init_scale < float("inf"),  # NaN fails too
            f"model.ista_init_scale must be > 0 (got {m.ista_init_scale}); null = the published kaiming-uniform init",
        )
    if m.ista_decoder == "separate":
        _check(
            m.ista_variant == "overcomplete",
            "model.ista_decoder: separate needs model.ista_variant: overcomplete (the square block's "
            "output is the code itself: it has no decoder)",
        )


def _validate_bimt(r: Recipe) -> None:
    b = r.bimt
    _check(b.locality >= 0, f"bimt.locality must be >= 0 (got {b.locality})")
    _check(b.layer_distance >= 0, f"bimt.layer_distance must be >= 0 (got {b.layer_distance})")
    _check(len(b.lambda_phases) >= 1, "bimt.lambda_phases needs at least one phase, e.g. [{start: 0, lam: 1e-3}]")
    starts = [p.start for p in b.lambda_phases]
    _check(all(0 <= s <= 1 for s in starts), f"bimt.lambda_phases: start is a fraction of train.max_steps in [0, 1] (got {starts})")
    _check(starts == sorted(starts), f"bimt.lambda_phases must be in increasing start order (got {starts})")
    _check(all(p.lam >= 0 for p in b.lambda_phases), "bimt.lambda_phases: lam must be >= 0")
    _check(b.swap_every >= 0, f"bimt.swap_every must be >= 0 (got {b.swap_every}); 0 = no swaps")
    _check(b.swap_top_k >= 1, f"bimt.swap_top_k must be >= 1 (got {b.swap_top_k})")
    _check(b.prune_threshold >= 0, f"bimt.prune_threshold must be >= 0 (got {b.prune_threshold})")
    _check(0 < b.mass_radius <= 1, f"bimt.mass_radius must be in (0, 1] (got {b.mass_radius})")
    _check(b.metrics_every >= 0, f"bimt.metrics_every must be >= 0 (got {b.metrics_every}); 0 = train.log_every")
    _check(len(set(b.maps)) == len(b.maps) and len(set(b.units)) == len(b.units), "bimt.maps and bimt.units must not repeat entries")
    if "heads" in b.units:
        _check("attention" in b.maps, "bimt.units has heads but bimt.maps has no attention: heads would never move")
    if "hidden" in b.units:
        _check("hidden" in b.maps, "bimt.units has hidden but bimt.maps has no hidden: hidden units would never move")
    t = b.toy
    _check(len(t.hidden) >= 1 and all(w >= 1 for w in t.hidden), f"bimt.toy.hidden must list layer widths >= 1 (got {t.hidden})")
    for name in ("steps", "train_samples", "test_samples"):
        _check(getattr(t, name) >= 1, f"bimt.toy.{name} must be >= 1 (got {getattr(t, name)})")
    _check(t.lr > 0 and t.noise >= 0, "bimt.toy.lr must be > 0 and bimt.toy.noise >= 0")
