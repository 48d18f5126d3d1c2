"""Visual-attenuation diagnostics (the paper's Section 2, spec section 10).

For every decoder layer of the LLM, averaged over heads and over the chosen query rows
(the answer tokens, the last prompt token, or the generated tokens):

* the visual attention ratio - the attention mass on the image tokens;
* the visual attention distribution - that attention renormalised over the image tokens
  (values for violins, its entropy in nats);
* heatmaps of the distribution over each image's token grid.

    from vif.diagnostics import diagnose, compare
    summary = diagnose(model, batches, "diag/")                    # model loaded with sdpa
    both = compare(model, "runs/vif_adapter", batches, "diag_cmp/")  # base vs base + VIF

The fast path never materialises an attention matrix: an observer on each attention
module (:mod:`vif.diagnostics.probe`) recomputes only the chosen rows from query and
key, and applies VIF's injection to them in injected layers. See docs/diagnostics.md.
"""

from .api import compare, diagnose, write_outputs
from .collect import Collection, SampleRecord, collect
from .probe import AttentionProbe, RowSelection, probing, select_rows
from .stats import summarise

__all__ = [
    "AttentionProbe",
    "Collection",
    "RowSelection",
    "SampleRecord",
    "collect",
    "compare",
    "diagnose",
    "probing",
    "select_rows",
    "summarise",
    "write_outputs",
]
