"""soflow_fast: fast, faithful training of SoFlow one-step generative models."""

import torch  # noqa: F401  (loads libc10 before the compiled soflow_fast._C can be imported)

__version__ = "0.1.0"
