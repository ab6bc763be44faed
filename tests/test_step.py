"""``TrainStep`` with the CUDA-graph plan (``run.cuda_graphs``), run on CPU as far as CPU allows.

CUDA graphs themselves need a GPU (the GPU suite's ``soflow-loss-graphs`` rows and TRAIN_SCOPES=graphs):
here the plan is forced on CPU, where torch.compile's mode="reduce-overhead" compiles the same graph
and skips the graphs, so the step's own duties under the plan are checked: a step begins a new
graph iteration, its logs outlive the next step, and the numbers equal the eager step's.
"""

from __future__ import annotations

import dataclasses

import torch

from soflow_fast.parallel import DistInfo
from soflow_fast.presets import build_config
from soflow_fast.step import StepPlan, TrainStep


def test_cuda_graph_plan_keeps_logs_and_equals_eager():
    cfg = build_config("digits", None, ["--batch_size=8", "--depth=1", "--hidden_size=32", "--num_heads=2"])
    cpu = torch.device("cpu")
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=cpu)
    eager_plan = StepPlan.resolve(cfg, cpu, 1)
    graph_plan = dataclasses.replace(eager_plan, compile=True, compile_scope="loss", cuda_graphs=True)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    logs = {}
    for name, plan in (("eager", eager_plan), ("graphs", graph_plan)):
        torch.manual_seed(1)
        model = cfg.model.build()
        step = TrainStep.build(cfg, model, dist_info, plan)
        assert step.plan.cuda_graphs == (name == "graphs")
        if name == "graphs":  # no throw-away backward before the first step: a recorded backward runs once
            assert step.loss_fn._probed
        logs[name] = [step(x, y, k) for k in range(3)]
        assert getattr(step.loss_fn, "error", None) is None  # compiled, not fallen back to eager
        assert getattr(step.loss_fn, "options", {}).get("mode") == ("reduce-overhead" if name == "graphs" else None)
    for a, b in zip(logs["eager"], logs["graphs"], strict=True):  # every step's logs, read after the last step
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
