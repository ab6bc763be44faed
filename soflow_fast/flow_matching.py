"""Plain flow matching (``run.objective=fm``): the network's F(x, t, t) trained as the velocity.

This is SoFlow's flow-matching term on every row of the batch: ``SoFlowObjective`` with
``velocity_loss_ratio`` = 1, so no consistency row is drawn and the loss of a batch is

    mean over rows of  w * mean over dims of (F(x_t, t, t) - target)^2,   w = 1 / (mse + eps)^p (detached)

with t ~ sigmoid(N(time_mean[0], time_std[0])) and the target v_t = d x_t / dt (eps - x0 on the Linear
path), or SPEC's guided target when guidance trains (labels and cfg_scale > 1: guidance is then baked in, as
SoFlow bakes it). The weight is SoFlow's adaptive one and ``p`` is the soflow section's: **p = 0 is the plain,
unweighted mean squared error of flow matching** (w = 1), the usual FM loss and the one the comparisons
(``soflow_fast.experiments``) train; the default p = 1 weights each row by 1 / (its error + eps) as SoFlow's
own flow-matching term does. The objective reads the soflow section for every other setting too (the noising
path, the time distribution, guidance), so a teacher and its student share them by construction, and it
needs Euler coefficients (v = F(x, t, t)), which the config checks.

Such a model is sampled by integrating its velocity from t = 1 to 0 (``default_sampler``: Heun; ``soflow-sample
--solver euler|heun --nfe N``), and is a teacher for SoFlow's teacher mode (``soflow_fast.teacher``).
"""

from __future__ import annotations

import dataclasses

from soflow_fast.objective import SoFlowConfig, SoFlowObjective


class FlowMatchingObjective(SoFlowObjective):
    """Flow matching for any module with the signature ``(x, t, s, y)``, on SoFlowObjective's protocol
    (``draw_batch``, ``loss_from_draws``, ``log_keys``), so ``TrainStep`` runs it unchanged.

    Args:
        config: the soflow section; ``velocity_loss_ratio`` is set to 1 and the consistency keys are unused.
        num_classes: as for ``SoFlowObjective``.
    """

    log_keys = ("loss", "fm_loss", "fm_mse", "fm_weight")
    default_sampler = "heun"  # what ``sampling.sample`` runs when no mode is given

    def __init__(self, config: SoFlowConfig | None = None, num_classes: int | None = None):
        config = config or SoFlowConfig()
        if config.coefficient_type != "Euler":
            raise ValueError(
                f"flow matching trains F(x, t, t) as the velocity: coefficient_type={config.coefficient_type}"
            )
        super().__init__(dataclasses.replace(config, velocity_loss_ratio=1.0, teacher_steps=0), num_classes)
