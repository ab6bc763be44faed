"""Triton kernels, installed as ``soflow_fast.kernels``."""
