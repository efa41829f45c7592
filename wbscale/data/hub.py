"""``data.tokenizer`` as a Hugging Face hub id: ``openai-community/gpt2`` -> its cached ``tokenizer.json``.

``data.tokenizer`` is ``bpe``, a path to a ``tokenizer.json``, or a hub model id, spelled
``owner/name`` (used when no such local path exists) or ``hf:owner/name`` (always the hub),
optionally with ``@revision``. A hub id is fetched with ``huggingface_hub.hf_hub_download``
(imported only then) into the hub cache (``HF_HOME``), so later runs, and offline runs
(``HF_HUB_OFFLINE=1``), read the cached file. Offline without a cached copy is one clear
error naming the ``hf download`` command to run where there is a network.
"""

from __future__ import annotations

import re
from pathlib import Path

from wbscale.errors import UserError

HUB_PREFIX = "hf:"
TOKENIZER_FILE = "tokenizer.json"
# owner/name, as the hub spells repo ids (letters, digits, '-', '_', '.'), optional @revision
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def hub_repo(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` names a hub repo rather than a local path, else None."""
    text = str(spec).strip()
    explicit = text.startswith(HUB_PREFIX)
    if explicit:
        text = text[len(HUB_PREFIX):]
    elif Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.endswith(".json"):
        return None
    found = _REPO_ID.fullmatch(text)
    if found is None:
        if explicit:
            raise UserError(f"data.tokenizer: {spec!r} is not a hub model id; write hf:owner/name (e.g. hf:openai-community/gpt2)")
        return None
    return found["repo"], found["rev"]


def resolve_tokenizer(spec: str | Path) -> Path:
    """The local ``tokenizer.json`` that ``data.tokenizer`` names: a path as is (expanded),
    a hub id downloaded to (or found in) the hub cache."""
    parsed = hub_repo(str(spec))
    if parsed is None:
        return Path(spec).expanduser()
    repo, revision = parsed
    where = repo + (f" --revision {revision}" if revision else "")
    fix = (
        f"on a machine with network run `hf download {where} {TOKENIZER_FILE} --local-dir tokenizers/{repo.split('/')[-1]}` "
        f"and set data.tokenizer to tokenizers/{repo.split('/')[-1]}/{TOKENIZER_FILE}"
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(
            f"data.tokenizer: '{spec}' is a hub id and huggingface_hub is not installed "
            f"(pip install huggingface_hub); or {fix}"
        ) from None
    try:
        return Path(hf_hub_download(repo, TOKENIZER_FILE, revision=revision))
    except Exception as err:  # offline, unknown repo, gated, no tokenizer.json: one message
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"data.tokenizer: could not get {TOKENIZER_FILE} of hub repo '{repo}'"
            + (f" at revision {revision}" if revision else "")
            + f" ({type(err).__name__}{': ' + first if first else ''}); offline with no cached copy? {fix}"
        ) from None
