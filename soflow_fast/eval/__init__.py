"""Sample-quality evaluation.

Re-exported here: set distances with known answers and a digits classifier (``metrics``), which
need no Inception network. The ADM evaluator's FID, sFID, Inception Score, precision and recall
live in ``soflow_fast.eval.adm`` (statistics) and ``soflow_fast.eval.inception`` (features; needs
torch-fidelity), run by ``python -m soflow_fast.evaluate``; they are not imported here, so this
package imports without the eval extra.
"""

from soflow_fast.eval.metrics import (
    METRICS,
    DigitsClassifier,
    DigitsFeatureExtractor,
    compare_sets,
    default_cache_dir,
    digits_feature_extractor,
    digits_label_accuracy,
    energy_distance,
    frechet_digits_distance,
    frechet_distance,
    frechet_distance_from_stats,
    mmd_rbf,
    sliced_wasserstein2,
    train_digits_classifier,
)

__all__ = [
    "METRICS",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "compare_sets",
    "default_cache_dir",
    "digits_feature_extractor",
    "digits_label_accuracy",
    "energy_distance",
    "frechet_digits_distance",
    "frechet_distance",
    "frechet_distance_from_stats",
    "mmd_rbf",
    "sliced_wasserstein2",
    "train_digits_classifier",
]
