"""``TrainStep`` under ``parallel.cuda_graphs``, run on CPU as far as CPU allows.

CUDA graphs themselves need a GPU (the GPU suite's ``soflow-loss-graphs`` and ``soflow-step-graphs``
rows): here the plans are forced on CPU. ``loss``: torch.compile's mode="reduce-overhead" compiles
the same graph and skips the graphs, so the step's duties under the plan are checked: a step begins
a new graph iteration, its logs outlive the next step, the numbers equal the eager step's. ``step``:
the capture is replaced by a stand-in with a graph's semantics (the captured call's outputs are
static tensors that each replay overwrites, fed from static inputs that each call copies into), so
the step's bookkeeping around the graph is checked against the eager step, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from soflow_fast.parallel import DistInfo
from soflow_fast.presets import build_config
from soflow_fast.step import StepPlan, TrainStep
from tests.utils import raises_naming

SMALL = ["--batch_size=8", "--depth=1", "--hidden_size=32", "--num_heads=2", "--grad_clip=1.0"]
CPU = torch.device("cpu")
DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)


def _steps(cfg, plan, n: int, capture=None):
    torch.manual_seed(1)
    model = cfg.model.build()
    step = TrainStep.build(cfg, model, DIST, plan)
    if capture is not None:
        step.graph.capture = capture(step)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    logs = [step(x, y, k) for k in range(n)]
    return step, model, logs


def test_loss_graph_plan_keeps_logs_and_equals_eager():
    cfg = build_config("digits", None, SMALL)
    eager_plan = StepPlan.resolve(cfg, CPU, 1)
    graph_plan = dataclasses.replace(eager_plan, compile=True, compile_scope="loss", cuda_graphs="loss")
    logs = {}
    for name, plan in (("eager", eager_plan), ("graphs", graph_plan)):
        step, _, logs[name] = _steps(cfg, plan, 3)
        assert getattr(step.loss_fn, "error", None) is None  # compiled, not fallen back to eager
        assert getattr(step.loss_fn, "options", {}).get("mode") == ("reduce-overhead" if name == "graphs" else None)
        if name == "graphs":  # no throw-away backward before the first step: a recorded backward runs once
            assert step.loss_fn._probed
    for a, b in zip(logs["eager"], logs["graphs"], strict=True):  # every step's logs, read after the last step
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def _stand_in_capture(step):
    """A CUDA graph's semantics without CUDA: capturing records without running (here: runs, then puts
    the model and optimiser back), the outputs are fixed tensors, and each replay rewrites them."""

    def capture(fn):
        model, optim = copy.deepcopy(step.model.state_dict()), copy.deepcopy(step.optimizer.state_dict())
        captured = fn()
        step.model.load_state_dict(model)
        step.optimizer.load_state_dict(optim)

        def replay():
            for k, v in fn().items():
                captured[k].copy_(v)

        return replay, captured

    return capture


def test_step_graph_bookkeeping_equals_the_eager_step():
    cfg = build_config("digits", None, SMALL)
    eager_plan = StepPlan.resolve(cfg, CPU, 1)
    eager, eager_model, eager_logs = _steps(cfg, eager_plan, 6)
    graphed, model, logs = _steps(cfg, dataclasses.replace(eager_plan, cuda_graphs="step"), 6, _stand_in_capture)
    assert graphed.graph.captured and graphed.graph.calls == 6  # 3 eager warm-up steps, a capture, replays
    for a, b in zip(eager_logs, logs, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (name, p), q in zip(eager_model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert graphed.ema.num_updates == eager.ema.num_updates == 6  # the EMA runs eagerly, every step
    assert graphed.scheduler.last_epoch == 6

    # a replay takes the inputs it was captured with, in shape and host values: a batch of another
    # size is one error naming what changed
    with raises_naming(ValueError, "input 0", "(8, 1, 8, 8)", "(4, 1, 8, 8)"):
        graphed(torch.randn(4, 1, 8, 8), torch.arange(4), 6)


def test_step_graph_refuses_dropout():
    cfg = build_config("cifar10", None, ["--model_channels=8", "--channel_mult=[1]", "--num_blocks=1"])
    plan = dataclasses.replace(StepPlan.resolve(cfg, CPU, 1), cuda_graphs="step")
    with raises_naming(ValueError, "parallel.cuda_graphs=step", "dropout"):
        TrainStep.build(cfg, cfg.model.build(), DIST, plan)


def test_resume_keeps_this_process_optimizer_flags():
    """A checkpoint's param groups carry the saving process's implementation flags; after a resume the
    optimiser runs as this process built it (``parallel.cuda_graphs=step`` needs capturable, whatever saved)."""
    from soflow_fast.checkpoint import ModelOptimizerState
    from soflow_fast.optim import keep_optimizer_impl

    saved_cfg = build_config("digits", None, SMALL)
    model = saved_cfg.model.build()
    opt = saved_cfg.optim.build(model.parameters(), CPU)
    model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2), torch.arange(2)).square().mean().backward()
    opt.step()
    state = ModelOptimizerState(model, opt).state_dict()
    assert opt.param_groups[0]["capturable"] is False

    graphed_cfg = build_config("digits", None, [*SMALL, "--cuda_graphs=step"])
    resumed = graphed_cfg.optim.build(model.parameters(), CPU, capturable=graphed_cfg.parallel.cuda_graphs == "step")
    ModelOptimizerState(model, resumed).load_state_dict(state)
    assert resumed.param_groups[0]["capturable"] is False  # what loading alone leaves
    keep_optimizer_impl(resumed)
    group = resumed.param_groups[0]
    assert group["capturable"] is True and group["foreach"] is True
    steps = [resumed.state[p]["step"] for p in group["params"]]
    assert all(s.dtype == torch.float32 and s.item() == 1.0 for s in steps)
    for p in group["params"]:  # the moments came through untouched
        assert torch.equal(resumed.state[p]["exp_avg"], opt.state[p]["exp_avg"])
