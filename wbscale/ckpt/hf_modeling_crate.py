"""The CRATE language model (Yu et al. 2023; CRATE-LM, Bai et al. 2024) for Hugging Face transformers.

Written into a model folder as ``modeling_crate.py`` by ``wbscale ckpt export --format hf``
(template: ``wbscale/ckpt/hf_modeling_crate.py``). Self-contained: torch and transformers,
no wbscale. It computes what ``wbscale.models.crate.CRATE`` computes, with the same parameter
names. Per layer, pre-norm and causal::

    x = x + MSSA(ln_1(x))     # q = k = v = x U_k per head; softmax_causal(W W^T / sqrt(p)) W; c_proj
    x = ISTA(ln_2(x))         # sparse code z in the dictionary D = W^T; NO residual

    overcomplete (W: m x d):  z1 = relu(eta x W^T - eta lam)
                              z2 = relu(z1 + eta (x - z1 W) W^T - eta lam);   out = z2 W
    square       (W: d x d):  out = z = relu(x + eta (x - x W^T) W - eta lam)

The sparse codes z of every layer are reachable two ways:

- ``model(input_ids, output_sparse_codes=True).sparse_codes``: a tuple, one (B, T, m) tensor
  per layer (``config.output_sparse_codes = True`` makes it the default);
- a forward hook on ``model.transformer.h[i].ista.code`` (an ``nn.Identity`` the code passes
  through), which also fires inside ``generate()``.

``output_hidden_states=True`` gives the residual stream: the embeddings, then each layer's
output, the last one after the final LayerNorm (GPT-2's convention). There is no KV cache:
``generate()`` re-reads the (last ``n_positions`` tokens of the) context for every new token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_crate import CrateConfig

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@dataclass
class CrateCausalLMOutput(ModelOutput):
    """``logits`` (B, T, vocab); ``loss`` with ``labels``; ``hidden_states`` (n_layer + 1 tensors
    of B x T x d) with ``output_hidden_states``; ``sparse_codes`` (n_layer tensors of B x T x m,
    the ISTA code z of each layer) with ``output_sparse_codes``."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple | None = None
    sparse_codes: tuple | None = None


class CrateMSSA(nn.Module):
    """Multi-head subspace self-attention: one bias-free U (d x d) split into heads, q = k = v."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)  # U = [U_1 .. U_K]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None):
        b, t, d = x.shape
        w = self.c_attn(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(w, w, w, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(w, w, w, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y))


class CrateISTA(nn.Module):
    """Unrolled ISTA on the dictionary D = W^T (``dictionary`` is W). Returns (out, z)."""

    def __init__(self, config):
        super().__init__()
        m = config.ista_expansion * config.n_embd if config.ista_variant == "overcomplete" else config.n_embd
        self.variant = config.ista_variant
        self.eta = config.ista_eta
        self.lam = config.ista_lambda
        self.dictionary = nn.Parameter(torch.empty(m, config.n_embd))
        self.code = nn.Identity()  # hook point: a forward hook here sees the sparse code z

    def forward(self, x):
        w, eta, lam = self.dictionary, self.eta, self.lam
        if self.variant == "overcomplete":
            z1 = F.relu(eta * (x @ w.t()) - eta * lam)
            u = x - z1 @ w
            z = self.code(F.relu(z1 + eta * (u @ w.t()) - eta * lam))
            return z @ w, z
        r = x - x @ w.t()
        z = self.code(F.relu(x + eta * (r @ w) - eta * lam))
        return z, z


class CrateBlock(nn.Module):
    """``x + MSSA(ln_1(x))``, then ``ISTA(ln_2(x))`` with no residual. Returns (x, z)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CrateMSSA(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.ista = CrateISTA(config)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return self.ista(self.ln_2(x))


def _init(tensor, fn, *args, **kwargs):
    # transformers >= 5 marks the tensors it loaded; only the others are (re)initialised.
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            fn(tensor, *args, **kwargs)


class CratePreTrainedModel(PreTrainedModel):
    config_class = CrateConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CrateBlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """wbscale's init: GPT-2's N(0, 0.02) (c_proj 0.02 / sqrt(2 n_layer)); the dictionary
        keeps the published CRATE kaiming-uniform init."""
        std = self.config.initializer_range
        if isinstance(module, CrateMSSA):
            _init(module.c_proj.weight, nn.init.normal_, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        elif isinstance(module, nn.Linear):
            _init(module.weight, nn.init.normal_, mean=0.0, std=std)
            if module.bias is not None:
                _init(module.bias, nn.init.zeros_)
        elif isinstance(module, nn.Embedding):
            _init(module.weight, nn.init.normal_, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            _init(module.weight, nn.init.ones_)
            _init(module.bias, nn.init.zeros_)
        elif isinstance(module, CrateISTA):
            _init(module.dictionary, nn.init.kaiming_uniform_)


class CrateModel(CratePreTrainedModel):
    """Embeddings, the CRATE layers and the final LayerNorm."""

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([CrateBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False,
                output_sparse_codes=False):
        """(last hidden state after ln_f, hidden states or None, sparse codes or None)."""
        b, t = input_ids.shape
        if t > self.config.n_positions:
            raise ValueError(f"sequence of length {t} exceeds n_positions {self.config.n_positions}")
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            # (B, 1, T, T); a padded query attends to itself so that its row is never empty
            attn_mask = (causal & keep[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=input_ids.device)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(t, dtype=torch.long, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        hidden, codes = [], []
        for block in self.h:
            if output_hidden_states:
                hidden.append(x)
            x, z = block(x, attn_mask)
            if output_sparse_codes:
                codes.append(z)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None), (tuple(codes) if output_sparse_codes else None)


class CrateForCausalLM(CratePreTrainedModel, GenerationMixin):
    """CRATE LM with its LM head tied to the token embedding."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.transformer = CrateModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        output_hidden_states=None,
        output_sparse_codes=None,
        return_dict=None,
        **kwargs,
    ):
        """Logits (B, T, vocab); ``labels`` (B, T) give the mean next-token loss (shifted
        inside, -100 ignored). Cache arguments from ``generate()`` are accepted and ignored."""
        if input_ids is None:
            raise ValueError("CrateForCausalLM needs input_ids (inputs_embeds is not supported)")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if output_sparse_codes is None:
            output_sparse_codes = bool(getattr(self.config, "output_sparse_codes", False))
        if return_dict is None:
            return_dict = bool(getattr(self.config, "return_dict", True))
        x, hidden, codes = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=output_hidden_states, output_sparse_codes=output_sparse_codes,
        )
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        out = CrateCausalLMOutput(loss=loss, logits=logits, hidden_states=hidden, sparse_codes=codes)
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: the whole context (cropped to n_positions, as wbscale does) every step.
        n = self.config.n_positions
        inputs = {"input_ids": input_ids[:, -n:]}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, -n:]
        for key in ("output_hidden_states", "output_sparse_codes", "return_dict"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs
