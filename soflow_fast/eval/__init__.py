"""Sample-quality evaluation.

Re-exported here: set distances with known answers and a digits classifier (``metrics``), which
need no Inception network. The ADM evaluator's FID, sFID, Inception Score, precision and recall
live in ``soflow_fast.eval.adm`` (statistics) and ``soflow_fast.eval.inception`` (features; needs
torch-fidelity), run by ``python -m soflow_fast.evaluate``; they are not imported here, so this
package imports without the eval extra.
"""

from soflow_fast.eval import metrics
from soflow_fast.eval.metrics import *  # noqa: F403 (the names metrics.__all__ lists)

__all__ = list(metrics.__all__)
