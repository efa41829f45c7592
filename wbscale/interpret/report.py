"""``wbscale interpret report``: one self-contained static HTML page of a collection.

No server, no network: CSS and JS are inline, the data is embedded as one JSON block.
Numbers per unit are plain JSON arrays; the bulky part, the context windows, is packed per
layer into base64 typed arrays (tokens as uint16/uint32, activations as float32), which
the page decodes only when a layer is first shown, and the atom table is paginated, so a
12-layer x 3072-atom report stays a file a browser opens in a second or two.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from wbscale.errors import UserError
from wbscale.interpret.collect import HISTOGRAM_FILE, SUMMARY_FILE, VOCAB_FILE, load_collection
from wbscale.io import atomic_write_text

__all__ = ["build_payload", "write_report"]

TEMPLATE = Path(__file__).with_name("report_template.html")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _layer_payload(path: Path, contexts: int, before: int, after: int, readout: int,
                   token_dtype: np.dtype, used: set[int]) -> dict[str, Any]:
    """Columns of one layer's units plus its packed context windows."""
    cols: dict[str, list[Any]] = {k: [] for k in ("freq", "max", "mean", "ent", "prom", "supp", "acttok")}
    dead: list[int] = []
    ptr, act, lengths, hit, tok = [0], [], [], [], []
    layer = None
    with path.open() as f:
        for line in f:
            u = json.loads(line)
            layer = u["layer"]
            cols["freq"].append(round(u["frequency"], 7))
            cols["max"].append(round(u["max"], 5))
            cols["mean"].append(round(u["mean"], 7))
            cols["ent"].append(None if u["token_entropy"] is None else round(u["token_entropy"], 3))
            prom = [i for i, _ in u["promotes"][:readout]]
            supp = [i for i, _ in u["suppresses"][:readout]]
            cols["prom"].append(prom)
            cols["supp"].append(supp)
            used.update(prom, supp)
            acting = Counter(c["tokens"][c["index"]] for c in u["top"])
            cols["acttok"].append([[i, n] for i, n in acting.most_common(5)])
            used.update(acting)
            if u["dead"]:
                dead.append(u["atom"])
            for c in u["top"][:contexts]:
                lo = max(0, c["index"] - before)
                window = c["tokens"][lo:c["index"] + after + 1]
                act.append(c["activation"])
                hit.append(c["index"] - lo)
                tok.extend(window)
                lengths.append(len(window))
                used.update(window)
            ptr.append(len(act))
    if layer is None:
        raise UserError(f"{path}: empty layer file; re-run `wbscale interpret collect --force`")
    # Window lengths and highlight offsets fit a byte unless --context asks for more.
    small = "<u1" if before + after + 1 <= 255 else "<u2"
    return {
        "layer": layer, **cols, "dead": dead,
        "ctx": {
            "ptr": _b64(np.asarray(ptr, "<u4")), "act": _b64(np.asarray(act, "<f4")),
            "len": _b64(np.asarray(lengths, small)), "hit": _b64(np.asarray(hit, small)),
            "tok": _b64(np.asarray(tok, token_dtype)), "small_bytes": np.dtype(small).itemsize,
        },
    }


def build_payload(collection: str | Path, contexts: int = 8, before: int = 10, after: int = 4,
                  readout: int = 5, title: str | None = None) -> dict[str, Any]:
    """The JSON the page embeds: meta, per-layer summary, histogram, used vocabulary, layers."""
    root = Path(collection)
    manifest = load_collection(root)
    summary = json.loads((root / SUMMARY_FILE).read_text())
    vocab = json.loads((root / VOCAB_FILE).read_text())
    token_bytes = 2 if manifest["vocab_size"] <= 65536 else 4
    token_dtype = np.dtype("<u2" if token_bytes == 2 else "<u4")
    used: set[int] = set()
    layers = [
        _layer_payload(root / manifest["files"][str(layer)], contexts, before, after, readout, token_dtype, used)
        for layer in manifest["layers"]
    ]
    hist = root / HISTOGRAM_FILE
    png = "data:image/png;base64," + base64.b64encode(hist.read_bytes()).decode() if hist.is_file() else None
    name = Path(manifest["ckpt"]).name
    return {
        "meta": {
            "title": title or f"wbscale white-box report: {name}", "arch": manifest["arch"],
            "unit_name": summary["unit_name"], "ckpt": manifest["ckpt"], "split": manifest["split"],
            "tokens": manifest["tokens"], "top_k": manifest["top_k"], "token_bytes": token_bytes,
        },
        "summary": summary["layers"],
        "hist_png": png,
        "vocab": {str(i): vocab[i] if i < len(vocab) else f"<{i}>" for i in sorted(used)},
        "layers": layers,
    }


def write_report(collection: str | Path, out: str | Path | None = None, contexts: int = 8,
                 before: int = 10, after: int = 4, readout: int = 5, title: str | None = None) -> Path:
    """Write the HTML report of ``collection`` (default: ``<collection>/report.html``).

    Per unit: up to ``contexts`` top contexts, each ``before`` tokens left and ``after``
    right of the activating token (at most what was collected), and ``readout`` promoted
    and suppressed tokens.
    """
    if contexts < 0 or before < 0 or after < 0 or readout < 0:
        raise UserError("--contexts, --context and --readout must be >= 0")
    payload = build_payload(collection, contexts, before, after, readout, title)
    # "<" escaped as \u003c: the JSON can then never close the <script> that holds it.
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    page = TEMPLATE.read_text(encoding="utf-8")
    page = page.replace("__WB_TITLE__", html.escape(payload["meta"]["title"])).replace("__WB_DATA__", data)
    path = Path(out) if out is not None else Path(collection) / "report.html"
    atomic_write_text(path, page)
    return path
