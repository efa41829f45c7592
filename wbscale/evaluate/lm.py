"""wbscale models as an lm-evaluation-harness model: ``lm_eval`` model name ``wbscale``.

Importing this module registers :class:`WbscaleLM` with lm-eval (it imports ``lm_eval``:
only :mod:`wbscale.evaluate.harness` and users who want the adapter import it)::

    import lm_eval, wbscale.evaluate.lm
    lm_eval.simple_evaluate(model="wbscale", model_args="pretrained=runs/demo,dtype=bfloat16",
                            tasks=["hellaswag"], device="cuda")

Any wbscale model (CRATE or GPT-2, a run, checkpoint or export folder, sharded DeepSpeed
checkpoints included), on any device, in fp32 / bf16 / fp16. Scoring follows lm-eval's
``hf`` model exactly (same context/continuation split, left truncation to the context
window, right padding, log-softmax over every logit id, rolling windows for perplexity),
so a wbscale model and its ``wbscale ckpt export --format hf`` folder score the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tokenizers import Tokenizer
from tqdm import tqdm

from wbscale.ckpt.export_hf import load_any
from wbscale.data.tokenizer import decode, encode, eot_id
from wbscale.errors import UserError
from wbscale.hardware import resolve_device
from wbscale.models.base import LanguageModel

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DEFAULT_AUTO_BATCH = 16  # batch_size="auto": no search, a fixed size


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` for auto (keep the checkpoint's), else the torch dtype named."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name) == "auto":
        return None
    if str(name) not in DTYPES:
        raise UserError(f"dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[str(name)]


def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_AUTO_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"batch_size {value!r}: give a positive integer") from None
    if size < 1:
        raise UserError(f"batch_size {value!r}: give a positive integer")
    return size


@register_model("wbscale")
class WbscaleLM(TemplateLM):
    """A wbscale :class:`~wbscale.models.base.LanguageModel` for lm-eval.

    ``pretrained``: a run, checkpoint or export folder (or pass ``model`` and ``tokenizer``
    objects). ``device``: auto | cpu | cuda | cuda:N. ``dtype``: auto (the checkpoint's) |
    float32 | bfloat16 | float16. ``max_length``: context window (default: block_size).
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: LanguageModel | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        device: str | None = "auto",
        batch_size: int | str = 1,
        dtype: str | torch.dtype | None = "auto",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_: Any,  # lm-eval passes max_batch_size and others the hf model knows
    ):
        super().__init__()
        self._device = torch.device(resolve_device(device or "auto"))
        if model is None:
            if pretrained is None:
                raise UserError("the wbscale lm-eval model needs pretrained=RUN_OR_CKPT (or model= and tokenizer=)")
            tok_path = tokenizer if isinstance(tokenizer, (str, Path)) else None
            model, _, loaded = load_any(pretrained, device="cpu", tokenizer=tok_path)
            tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else loaded
        if not isinstance(tokenizer, Tokenizer):
            raise UserError(
                f"{pretrained or 'model'}: no tokenizer found; pass tokenizer=PATH/tokenizer.json"
            )
        dt = torch_dtype(dtype)
        self.model = model.to(device=self._device, dtype=dt).eval() if dt else model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.name = str(pretrained) if pretrained is not None else type(model).__name__
        self._eot = eot_id(tokenizer)
        self._max_length = int(max_length or model.config.block_size)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size_per_gpu = _batch_size(batch_size)

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._eot  # the exported HF tokenizer has bos = eos = the end-of-text token

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"wbscale-{self.name}".replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return encode(self.tokenizer, string)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)
        return decode(self.tokenizer, tokens)

    # ------------------------------------------------------------------ model calls
    @torch.no_grad()
    def _logits(self, inps: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        return self.model(inps)[0]

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy one) per request."""

        def by_length(req):  # longest first, as the hf model: padding and OOMs up front
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        res: list[tuple[float, bool]] = []
        ordered = Collator(requests, sort_fn=by_length)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for chunk in ordered.get_batched(n=override_bs or self.batch_size):
            inps, inplens, conts = [], [], []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc:
                    raise ValueError("lm-eval gave an empty context or continuation")
                # (context + continuation) left-truncated to max_length + 1, the last token dropped
                inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                inps.append(inp)
                inplens.append(len(inp))
                conts.append(continuation_enc)
            width = max(inplens)
            batch = torch.zeros(len(inps), width, dtype=torch.long)
            for i, inp in enumerate(inps):
                batch[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logprobs = F.log_softmax(self._logits(batch.to(self.device)).float(), dim=-1)
            for (request, _, _), row, inplen, cont in zip(chunk, logprobs, inplens, conts, strict=True):
                window = row[inplen - len(cont): inplen]  # (len(cont), vocab)
                target = torch.tensor(cont, dtype=torch.long, device=self.device)
                greedy = bool((window.argmax(dim=-1) == target).all())
                answer = (float(window.gather(1, target[:, None]).sum()), greedy)
                res.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                pbar.update(1)
        pbar.close()
        return ordered.get_original(res)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of ``max_length`` tokens."""
        windows, counts = [], []
        for (string,) in tqdm([req.args for req in requests], disable=disable_tqdm or self.rank != 0):
            doc = list(
                map(
                    lm_utils.make_disjoint_window,
                    lm_utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
            )
            windows.extend((None, *w) for w in doc)
            counts.append(len(doc))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        out, start = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[start: start + n])
            start += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``/``temperature``) continuations, cut at the
        first ``until`` string or the end-of-text token, at most ``max_gen_toks`` tokens."""
        out = []
        eot_text = self.tokenizer.id_to_token(self._eot)
        for context, gen_kwargs in tqdm([req.args for req in requests], disable=disable_tqdm or self.rank != 0):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eot_text and eot_text not in until:
                until.append(eot_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            ids = self.tok_encode(context) or [self.prefix_token_id]
            if max_new < self.max_length:
                ids = ids[-(self.max_length - max_new):]
            idx = torch.tensor([ids], dtype=torch.long, device=self.device)
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                logits = self._logits(idx[:, -self.max_length:])[:, -1, :].float()
                if sample:
                    nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
                else:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                token = int(nxt)
                if token == self._eot:
                    break
                new.append(token)
                idx = torch.cat([idx, nxt], dim=1)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
