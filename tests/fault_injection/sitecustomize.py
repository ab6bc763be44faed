"""Fault injection for the tests, loaded by Python at start-up (as ``sitecustomize``) in the processes that
the tests start with this folder on PYTHONPATH (``tests.utils.child_env``).

``SOFLOW_TEST_KILL_AT_STEP=N`` sends the process SIGKILL (or the signal ``SOFLOW_TEST_KILL_SIGNAL`` names:
``TERM``, ``INT``) right after training step N, the moment a crash or a scheduler's signal would come:
the step's update is done, nothing after it (logging, the checkpoint of step N) has run. Without the
variable nothing is patched.
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys

_AT = os.environ.get("SOFLOW_TEST_KILL_AT_STEP")


def _patch(step_module) -> None:
    at = int(_AT)
    sig = signal.Signals["SIG" + os.environ.get("SOFLOW_TEST_KILL_SIGNAL", "KILL")]
    call = step_module.TrainStep.__call__

    def call_then_signal(self, x, y, step):
        logs = call(self, x, y, step)
        if step + 1 == at:  # step k of the loop is training step k + 1
            os.kill(os.getpid(), sig)
        return logs

    step_module.TrainStep.__call__ = call_then_signal


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``soflow_fast.step`` as Python would, and patches it once it has been executed."""

    def find_spec(self, name, path, target=None):
        if name != "soflow_fast.step":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _AT is not None:
    sys.meta_path.insert(0, _PatchAfterImport())
