"""White-box inspection: what each ISTA atom (CRATE) or MLP neuron (GPT-2) responds to.

- :func:`collect`: stream held-out tokens through a checkpoint; keep every unit's
  top-activating contexts (streaming top-k), activation frequency and mean, and its
  atom -> token readout; JSON lines + summary + manifest, resumable.
- :func:`write_report`: one self-contained static HTML page of a collection.
- :func:`compare`: two collections (e.g. CRATE vs GPT-2) side by side, table + PNG.

See docs/interpret.md.
"""

from __future__ import annotations

from wbscale.interpret.collect import StreamingTopK, collect, load_collection, token_entropy
from wbscale.interpret.compare import compare
from wbscale.interpret.readout import readout_scores, token_readout, unit_directions
from wbscale.interpret.report import write_report

__all__ = [
    "StreamingTopK",
    "collect",
    "compare",
    "load_collection",
    "readout_scores",
    "token_entropy",
    "token_readout",
    "unit_directions",
    "write_report",
]
