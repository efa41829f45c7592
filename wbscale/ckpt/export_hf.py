"""``wbscale ckpt export --format hf``: a run, checkpoint or export folder -> a Hugging Face model folder.

GPT-2 becomes a standard ``GPT2LMHeadModel`` folder; CRATE a folder with its own
``configuration_crate.py`` / ``modeling_crate.py`` (generated from the templates
``hf_configuration_crate.py`` / ``hf_modeling_crate.py`` next to this file, no wbscale import
at load time) that loads with ``trust_remote_code=True``::

    OUT/config.json                 GPT2Config, or CrateConfig + auto_map
    OUT/generation_config.json      eos / pad token ids (greedy by default)
    OUT/model.safetensors           weights; the LM head is tied to transformer.wte.weight
    OUT/tokenizer.json              the run's tokenizer, for PreTrainedTokenizerFast
    OUT/tokenizer_config.json       + special_tokens_map.json (EOT is bos = eos = unk = pad)
    OUT/configuration_crate.py      CRATE only
    OUT/modeling_crate.py           CRATE only
    OUT/README.md                   how to load it, where the sparse codes are

The vocabulary keeps wbscale's padding (a multiple of 64; ``config.vocab_size`` is the
padded size, the extra ids are never produced by the tokenizer and are suppressed in
``generate``), so the logits equal wbscale's over every id. Nothing here imports
transformers: exporting does not need it, loading the folder does. The folder is written
into ``.OUT.tmp`` and renamed, with files 0644.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from wbscale.ckpt.consolidate import consolidate
from wbscale.ckpt.format import read_checkpoint
from wbscale.ckpt.load import FILE_MODE, RECIPE_FILE, WEIGHTS_FILE, load_for_inference
from wbscale.config import Recipe
from wbscale.data.tokenizer import eot_id, vocab_size
from wbscale.errors import UserError
from wbscale.models.base import LanguageModel

FORMATS = ("hf",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TEMPLATES = {"configuration_crate.py": "hf_configuration_crate.py", "modeling_crate.py": "hf_modeling_crate.py"}
# HF GPT-2 uses Conv1D, whose weight is (in, out): the transpose of nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---------------------------------------------------------------------------- loading


def load_any(path: str | Path, device: str = "cpu", tokenizer: str | Path | None = None
             ) -> tuple[LanguageModel, Recipe, Tokenizer | None]:
    """:func:`~wbscale.ckpt.load.load_for_inference`, also for sharded (DeepSpeed) checkpoints,
    which are consolidated into a temporary folder first."""
    path = Path(path)
    if path.exists() and not ((path / WEIGHTS_FILE).is_file() and (path / RECIPE_FILE).is_file()):
        info = read_checkpoint(path)
        if info.model_path.is_dir():
            with tempfile.TemporaryDirectory(prefix="wbscale-consolidate-") as tmp:
                folder = consolidate(info.path, Path(tmp) / "model")
                return load_for_inference(folder, tokenizer=tokenizer, device=device)
    return load_for_inference(path, tokenizer=tokenizer, device=device)


# ---------------------------------------------------------------------------- weights and config


def hf_state_dict(model: LanguageModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the HF names (GPT-2: Conv1D weights transposed; CRATE: as is).

    The tied LM head is stored once, as ``transformer.wte.weight`` (transformers re-ties it).
    """
    arch = model.config.arch
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        value = value.detach().to("cpu")
        if arch == "gpt2" and key.endswith(_CONV1D):
            value = value.t()
        out[key] = value.to(dtype or value.dtype).contiguous().clone()
    return out


def _special_ids(tok: Tokenizer | None) -> dict[str, int | None]:
    eot = eot_id(tok) if tok is not None else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def hf_config(model: LanguageModel, tok: Tokenizer | None, dtype: torch.dtype) -> dict[str, Any]:
    """config.json: ``GPT2Config`` for GPT-2, ``CrateConfig`` (with ``auto_map``) for CRATE."""
    c = model.config
    common = {
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": c.arch == "gpt2",
        "dtype": _HF_DTYPE[dtype],
        "torch_dtype": _HF_DTYPE[dtype],  # the key transformers < 4.56 reads
        **_special_ids(tok),
    }
    if c.arch == "gpt2":
        if c.rope:
            raise UserError(
                "model.rope: Hugging Face's GPT2LMHeadModel has no rotary positions, so a GPT-2 trained "
                "with them cannot be exported as one; export a run with model.rope: false"
            )
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            **common,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    if c.arch == "crate":
        from wbscale.models.crate import nondefault_options

        options = nondefault_options(c)
        if options:
            raise UserError(
                f"model.{', model.'.join(options)}: the generated Hugging Face code implements the published "
                "CRATE block only, so a model with these block options cannot be exported yet"
            )
        return {
            "architectures": ["CrateForCausalLM"],
            "model_type": "crate",
            "auto_map": {
                "AutoConfig": "configuration_crate.CrateConfig",
                "AutoModel": "modeling_crate.CrateModel",
                "AutoModelForCausalLM": "modeling_crate.CrateForCausalLM",
            },
            **common,
            "ista_variant": c.ista_variant,
            "ista_expansion": c.ista_expansion,
            "ista_eta": c.ista_eta,
            "ista_lambda": c.ista_lambda,
            "dropout": c.dropout,
            "output_sparse_codes": False,
        }
    raise UserError(f"model.arch {c.arch!r} cannot be exported to the Hugging Face format")


def _generation_config(model: LanguageModel, tok: Tokenizer | None) -> dict[str, Any]:
    ids = _special_ids(tok)
    gen: dict[str, Any] = {**ids, "do_sample": False, "use_cache": model.config.arch == "gpt2"}
    if tok is not None and vocab_size(tok) < model.config.vocab_size:  # the padding rows
        gen["suppress_tokens"] = list(range(vocab_size(tok), model.config.vocab_size))
    return {k: v for k, v in gen.items() if v is not None}


def _tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, str]:
    eot = tok.id_to_token(eot_id(tok))
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids
    }
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def _readme(model: LanguageModel, has_tokenizer: bool) -> str:
    c = model.config
    remote = ", trust_remote_code=True" if c.arch == "crate" else ""
    lines = [
        f"# wbscale {c.arch} language model ({c.n_layer} layers, d = {c.n_embd}, {c.n_head} heads, "
        f"context {c.block_size})",
        "",
        "Exported by `wbscale ckpt export --format hf`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if has_tokenizer else ""),
        'FOLDER = "path/to/this/folder"',
        f"model = AutoModelForCausalLM.from_pretrained(FOLDER{remote})",
    ]
    if has_tokenizer:
        lines += [
            f"tok = AutoTokenizer.from_pretrained(FOLDER{remote})",
            'ids = tok("Once upon a time", return_tensors="pt").input_ids',
            "print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))",
        ]
    lines.append("```")
    lines += [
        "",
        f"`config.vocab_size` ({c.vocab_size}) is the tokenizer's vocabulary padded to a multiple of 64; "
        "the padding ids never occur in text and `generation_config.json` suppresses them.",
    ]
    if c.arch == "crate":
        lines += [
            "",
            f"ISTA variant `{c.ista_variant}`. Sparse codes (the ISTA code z of each layer):",
            "",
            "- `model(ids, output_sparse_codes=True).sparse_codes`: one (batch, tokens, atoms) tensor per layer;",
            "- a forward hook on `model.transformer.h[i].ista.code` (an `nn.Identity` the code passes through);",
            "- `output_hidden_states=True`: the residual stream (embeddings, each layer's output; the last after `ln_f`).",
            "",
            "There is no KV cache: `generate()` re-reads the context for each new token.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- writing


def _write(path: Path, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_hf_folder(model: LanguageModel, tok: Tokenizer | None, out: str | Path, dtype: str | None = None) -> Path:
    """Write ``model`` (and ``tok``) as a Hugging Face folder at ``out``, atomically."""
    arch = model.config.arch
    if arch not in ("gpt2", "crate"):
        raise UserError(f"model.arch {arch!r} cannot be exported to the Hugging Face format")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    weights = hf_state_dict(model, DTYPES[dtype] if dtype else None)
    torch_dtype = next(iter(weights.values())).dtype
    if torch_dtype not in _HF_DTYPE:
        raise UserError(f"weights are {torch_dtype}; export with --dtype fp32, bf16 or fp16")

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        files: dict[str, str] = {
            "config.json": json.dumps(hf_config(model, tok, torch_dtype), indent=2) + "\n",
            "generation_config.json": json.dumps(_generation_config(model, tok), indent=2) + "\n",
            "README.md": _readme(model, tok is not None),
        }
        if tok is not None:
            files.update(_tokenizer_files(tok, model.config.block_size))
        if arch == "crate":
            here = Path(__file__).resolve().parent
            for name, template in TEMPLATES.items():
                files[name] = (here / template).read_text(encoding="utf-8")
        for name, text in files.items():
            _write(tmp / name, text)
        for child in tmp.iterdir():
            child.chmod(FILE_MODE)  # safetensors' save_file leaves 0600
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf(path: str | Path, out: str | Path, dtype: str | None = None, tokenizer: str | Path | None = None) -> Path:
    """``wbscale ckpt export --format hf PATH --out OUT``: PATH is a run, checkpoint or export folder."""
    model, _, tok = load_any(path, device="cpu", tokenizer=tokenizer)
    if tok is None:
        raise UserError(
            f"{path}: no tokenizer.json found with this checkpoint; pass --tokenizer PATH/tokenizer.json "
            "(a Hugging Face folder without one cannot encode text)"
        )
    if vocab_size(tok) > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has more ids than the model's vocabulary ({model.config.vocab_size})")
    return write_hf_folder(model, tok, out, dtype=dtype)
