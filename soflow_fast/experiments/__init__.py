"""Experiments that train and compare objectives end to end (``python -m soflow_fast.experiments.compare``)."""
