"""Build entry for soflow_fast.

The Triton kernels are the subpackage ``soflow_fast.kernels`` (``soflow_fast/kernels/``), found by
``find_packages`` like every other subpackage.

The C++/CUDA extension ``soflow_fast._C`` (sources in ``csrc/``, see ``csrc/README.md``) is built
with torch's cpp_extension, so install torch first and use ``pip install --no-build-isolation``.
Environment switches:

* ``SOFLOW_NO_EXT=1``   skip the extension (pure-Python install; ``soflow_fast.ema`` falls back).
* ``SOFLOW_NO_CUDA=1``  build only the CPU part even when torch has CUDA and nvcc is found.
* ``TORCH_CUDA_ARCH_LIST`` GPU architectures for the CUDA part (default here: ``9.0``).
* ``MAX_JOBS``          parallel compile jobs for ninja (torch's own switch).
"""

import os
import shutil

from setuptools import find_packages, setup

packages = find_packages(include=["soflow_fast", "soflow_fast.*"])


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home() -> str | None:
    """Toolkit root holding bin/nvcc and include/cuda_runtime.h, or None."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return os.environ[key]
    # `which nvcc` can be a wrapper script (here /usr/local/bin/nvcc), whose parent is no toolkit
    # root; torch would then look for headers and libcudart under /usr/local. Prefer a real root.
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


def _extension_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for soflow_fast._C, or nothing when it is switched off or impossible."""
    if _truthy("SOFLOW_NO_EXT"):
        print("soflow_fast: SOFLOW_NO_EXT set, skipping the C++ extension (soflow_fast.ema falls back to torch)")
        return [], {}
    try:
        import torch
    except ImportError:
        print(
            "soflow_fast: torch is not importable at build time, skipping the C++ extension; install torch "
            "first and use `pip install --no-build-isolation`"
        )
        return [], {}

    with_cuda = False
    if not _truthy("SOFLOW_NO_CUDA") and torch.version.cuda is not None:
        home = _cuda_home()
        if home is not None:
            # cpp_extension reads CUDA_HOME once, at import, so it must be set before the import below.
            os.environ.setdefault("CUDA_HOME", home)
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
            with_cuda = True
        else:
            print("soflow_fast: no nvcc found, building the CPU part of soflow_fast._C only")
    from torch.utils import cpp_extension

    # -g0 undoes the -g that Python's own CFLAGS add: debug info triples compile time and .so size.
    cxx = ["-O3", "-g0"]
    link = []
    if torch.__config__.parallel_info().find("ATen parallel backend: OpenMP") >= 0:
        # at::parallel_for is an inline `omp parallel` region under an OpenMP torch: without
        # -fopenmp it would silently run on one thread. libgomp resolves to the copy torch loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = ["csrc/ema.cpp", "csrc/bindings.cpp"]
    kwargs = {"extra_link_args": link}
    if with_cuda:
        sources.append("csrc/ema_cuda.cu")
        kwargs["define_macros"] = [("SOFLOW_WITH_CUDA", "1")]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3"]}
        ext = cpp_extension.CUDAExtension("soflow_fast._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = cpp_extension.CppExtension("soflow_fast._C", sources, **kwargs)
    cuda_note = f"yes, archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "no"
    print(f"soflow_fast: building soflow_fast._C (CUDA part: {cuda_note})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

# The project's metadata, dependencies, extras and console commands are in pyproject.toml; this file
# adds the C++/CUDA extension, which needs code to configure.
setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
