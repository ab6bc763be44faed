"""soflow_fast: fast, faithful training of SoFlow one-step generative models."""

__version__ = "0.1.0"
