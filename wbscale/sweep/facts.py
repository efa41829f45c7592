"""What a recipe costs before it runs: parameters, tokens, training compute, stated target.

Parameters come from the model itself, built on PyTorch's ``meta`` device (no memory, no
time), so they are exact for every shape, CRATE's dictionary and the tied LM head included.
Two counts are kept:

- ``params``: every unique parameter (the tied head/embedding once);
- ``non_embedding_params``: without the token and position embeddings. This is the N of
  the scaling-law literature (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
  Sec. 2.1), the count that makes small models of different vocabularies comparable. It is
  *not* ``LanguageModel.num_params()``, which (as nanoGPT) drops the position table only.

The vocabulary is the model's ``vocab_size``, else the tokenizer's padded to a multiple of
64 (``data.tokenizer: char``: the prepared folder's characters, 128 before it is prepared).

Tokens are what the run will see: ``max_steps x micro_batch x grad_accum x block_size x
devices x nodes``. Training compute is ``flops_per_token(block_size) x tokens`` with the
model's own FLOP count (forward + backward, attention included; ``LanguageModel``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from wbscale.config import Recipe, resolve_recipe_path
from wbscale.data.tokenizer import expected_vocab_size
from wbscale.sizing import model_vocab, tokens_per_step

_TARGET_LINE = re.compile(r"^#\s*target\s*:\s*(.*)$", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+|\d+)(?![\w.])")


@dataclass(frozen=True)
class RunFacts:
    """Size and cost of the run a recipe describes."""

    params: int
    non_embedding_params: int
    vocab_size: int
    flops_per_token: int  # training (forward + backward) FLOPs per token at block_size
    tokens: int  # tokens the whole run trains on

    @property
    def compute(self) -> float:
        """Training FLOPs of the whole run."""
        return float(self.flops_per_token) * float(self.tokens)


def recipe_facts(recipe: Recipe) -> RunFacts:
    """Parameters (model built on ``meta``), FLOPs/token and tokens of ``recipe``."""
    import torch

    from wbscale.models import build_model

    vocab, _ = model_vocab(recipe, expected_vocab_size(recipe.data))  # the rule `recipes check` uses
    cfg = dataclasses.replace(recipe.model, vocab_size=vocab, pretrained=None, ista_kernel="eager")
    with torch.device("meta"):
        model = build_model(cfg)
    params = model.num_params(non_embedding=False)
    embeddings = (cfg.vocab_size + cfg.block_size) * cfg.n_embd
    return RunFacts(
        params=params,
        non_embedding_params=params - embeddings,
        vocab_size=vocab,
        flops_per_token=int(model.flops_per_token(cfg.block_size)),
        tokens=recipe.train.max_steps * tokens_per_step(recipe),
    )


# ---------------------------------------------------------------------------- header


def recipe_header(name_or_path: str | Path) -> str:
    """The comment block a recipe file starts with, ``#`` markers removed."""
    path = resolve_recipe_path(str(name_or_path))
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def recipe_target(name_or_path: str | Path) -> tuple[float | None, str]:
    """The ``# Target:`` entry of a recipe's header: (val loss or None, its text).

    The entry runs on over the indented comment lines below it. The value is its first
    number; ``None`` when it starts with ``none`` (``none published; record the first run``)
    or the header has no target entry.
    """
    path = resolve_recipe_path(str(name_or_path))
    text: list[str] | None = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if text is None:
            match = _TARGET_LINE.match(line)
            if match:
                text = [match.group(1).strip()]
        elif line.startswith("#  ") and line[1:].strip():
            text.append(line[1:].strip())
        else:
            break
    if text is None:
        return None, ""
    joined = " ".join(text)
    if joined.lower().startswith("none"):
        return None, joined
    number = _NUMBER.search(joined)
    return (float(number.group(1)) if number else None), joined


# ---------------------------------------------------------------------------- formatting


def human_count(n: float) -> str:
    """1234567 -> '1.23M' (K, M, B, T; three significant digits)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n:.0f}"


def human_flops(f: float) -> str:
    """Training compute as 1.2e15 FLOPs -> '1.20 PFLOP'."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


# ---------------------------------------------------------------------------- catalog


def recipe_catalog(recipes_dir: Path | None = None) -> list[dict[str, object]]:
    """One row per ``recipes/*.yaml``: name, model, params, tokens, data, steps, target."""
    from wbscale.config import RECIPES_DIR, load_recipe

    rows = []
    for path in sorted((recipes_dir or RECIPES_DIR).glob("*.yaml")):
        recipe = load_recipe(str(path))
        facts = recipe_facts(recipe)
        target, target_text = recipe_target(path)
        m, d = recipe.model, recipe.distributed
        rows.append({
            "name": path.stem,
            "arch": m.arch,
            "shape": f"{m.n_layer}L-{m.n_embd}d-{m.n_head}h",
            "params": facts.params,
            "non_embedding_params": facts.non_embedding_params,
            "tokens": facts.tokens,
            "compute_flops": facts.compute,
            "data": recipe.data.source,
            "steps": recipe.train.max_steps,
            "hardware": (f"{d.nodes}x{d.devices} {d.strategy}" + (f" zero{d.zero_stage}" if d.strategy == "deepspeed" else "")),
            "target": target,
            "target_text": target_text,
        })
    return rows


def format_catalog(rows: list[dict[str, object]]) -> str:
    """``recipes list`` as an aligned text table."""
    header = ("name", "arch", "shape", "params", "tokens", "data", "steps", "target")
    cells = [header] + [
        (
            str(r["name"]), str(r["arch"]), str(r["shape"]), human_count(float(r["params"])),
            human_count(float(r["tokens"])), str(r["data"]), str(r["steps"]),
            _target_cell(r),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.append(
        "target: val loss from the recipe's `# Target:` line (`wbscale recipes list --json` has its source); "
        "(x) = a published number for another setup, not directly comparable; - = none published"
    )
    return "\n".join(lines)


def _target_cell(row: dict[str, object]) -> str:
    if row["target"] is None:
        return "-"
    value = f"{row['target']:.3f}"
    return f"({value})" if "not directly comparable" in str(row["target_text"]) else value
