// Public C++ entry points of soflow_fast._C: multi-tensor EMA updates and buffer copies.
//
// These are what the pybind11 module exposes and what the ctest executable calls, so they take
// ATen tensors and validate every argument before touching memory: a bad list element must raise
// a message that names the element and the problem, never corrupt memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ema_launch.h"

namespace soflow {

// Thrown for a bad dtype, device or tensor kind; bindings.cpp maps it to Python's TypeError, while
// std::invalid_argument (wrong lengths, shapes, layouts, decay values) becomes ValueError.
class ArgTypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// emas[i] = decay * emas[i] + (1 - decay) * params[i], for every i, in one pass.
//
// emas: float32 or float64 tensors; params: float32 or bfloat16, same shape, all contiguous and
// on one device. fp64 computes the blend in double precision even for float32 EMA buffers.
void ema_update_(const std::vector<at::Tensor>& emas, const std::vector<at::Tensor>& params, double decay,
                 bool fp64);

// Several EMA rates at once: emas_per_decay[k][i] follows decays[k]. Each parameter is read from
// memory once for all rates, which is the point: EMA is bandwidth-bound.
void ema_update_multi_(const std::vector<std::vector<at::Tensor>>& emas_per_decay,
                       const std::vector<at::Tensor>& params, const std::vector<double>& decays, bool fp64);

// dst[i].copy_(src[i]) for every i as one parallel pass; dtypes and shapes must match exactly
// (this is for non-parameter buffers, where a silent cast would hide a bug).
void copy_(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src);

// Which copy of the CPU kernels runs: "avx2" (AVX2+FMA, picked when the CPU has it) or "default".
// set_cpu_isa exists so tests can cover both copies on one machine.
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

// Whether this build carries the CUDA kernels (false under SOFLOW_NO_CUDA=1 or without nvcc).
bool cuda_built();

}  // namespace soflow
