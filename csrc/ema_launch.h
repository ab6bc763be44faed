// Contract between the host code (ema.cpp) and the CUDA kernels (ema_cuda.cu).
//
// Plain C++ only: the .cu includes this and the light c10/cuda headers, nothing from ATen, which
// keeps its nvcc compile near 30 s instead of ~2 min. The host side validates the tensors, writes
// a table of raw pointers in ordinary host memory and allocates a device buffer for it; the launch
// copies the table in on the stream (an asynchronous copy from pageable memory, staged by the
// driver before the call returns, so the host vector may go at once) and starts the kernel.
#pragma once

#include <cstdint>

namespace soflow {

// Most decay rates one fused update accepts. The CUDA kernel takes the decays by value in its
// launch arguments, and more than a handful of EMA rates per model is not a real use case.
constexpr int kMaxDecays = 8;

namespace cuda_impl {

// One thread block updates this many elements of one tensor (a "chunk"). Large enough that a
// block streams for a while, small enough that a 675M-parameter model gives ~40k blocks.
constexpr int64_t kEmaChunk = 16384;
// Same for the buffer copy, counted in bytes.
constexpr int64_t kCopyChunk = 65536;

// Per-tensor flags stored in the last column of each table row.
constexpr int64_t kEmaIsF64 = 1;     // EMA buffer is float64 (else float32)
constexpr int64_t kParamIsBF16 = 2;  // parameter is bfloat16 (else float32)
constexpr int64_t kAligned16 = 4;    // every pointer of the row is 16-byte aligned

// EMA table, int64 (host copy in host_table, device buffer in table, table_len entries each):
//   rows    [num_tensors][num_decays + 3] = ema_ptr[0..K-1], param_ptr, numel, flags
//   chunks  [num_chunks] = (tensor_index << 32) | chunk_index_within_tensor
struct EmaArgs {
  int64_t* table;
  const int64_t* host_table;
  int64_t table_len;
  int64_t num_tensors;
  int64_t num_chunks;
  int num_decays;
  bool fp64;
  double decays[kMaxDecays];
  int device;
};

// Copy table, int64, host and device copies as for the EMA table:
//   rows    [num_tensors][4] = dst_ptr, src_ptr, nbytes, flags (kAligned16 only)
//   chunks  [num_chunks] as above, chunk index counted in kCopyChunk bytes
struct CopyArgs {
  int64_t* table;
  const int64_t* host_table;
  int64_t table_len;
  int64_t num_tensors;
  int64_t num_chunks;
  int device;
};

// Both launch on the current stream of `device` and return without synchronising.
void launch_ema(const EmaArgs& args);
void launch_copy(const CopyArgs& args);

}  // namespace cuda_impl
}  // namespace soflow
