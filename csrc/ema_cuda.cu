// CUDA half of soflow_fast._C: one launch updates every tensor of a model (multi-tensor apply).
//
// The host (ema.cpp) has already checked the tensors and written a table of raw pointers and a
// chunk list into device memory (layout in ema_launch.h). Block b looks up chunk b, i.e. one
// tensor and a kEmaChunk-element window of it, and streams that window with 16-byte loads.
// Only light c10 headers are included so nvcc stays fast; the launch uses the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ema_launch.h"

namespace soflow::cuda_impl {
namespace {

constexpr int kThreads = 256;
// Elements per thread per step: 8 bf16 values are one 16-byte load, 8 fp32 values two.
constexpr int kVec = 8;

struct BF16 {
  uint16_t bits;
};

template <typename A>
__device__ __forceinline__ A to_acc(float x) {
  return static_cast<A>(x);
}
template <typename A>
__device__ __forceinline__ A to_acc(double x) {
  return static_cast<A>(x);
}
template <typename A>
__device__ __forceinline__ A to_acc(BF16 x) {
  // bfloat16 is the top half of a float32.
  return static_cast<A>(__uint_as_float(static_cast<uint32_t>(x.bits) << 16));
}

// kVec elements moved as whole 16-byte transactions (1, 2 or 4 of them for bf16, fp32, fp64).
template <typename T>
struct alignas(16) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {
  Pack<T> out;
  const uint4* src = reinterpret_cast<const uint4*>(ptr);
  uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Pack<T>) / 16); ++i) dst[i] = src[i];
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& in) {
  uint4* dst = reinterpret_cast<uint4*>(ptr);
  const uint4* src = reinterpret_cast<const uint4*>(&in);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Pack<T>) / 16); ++i) dst[i] = src[i];
}

// Decay rates in both precisions, passed by value with the launch (no device reads needed).
struct Rates {
  float f[kMaxDecays];
  float omf[kMaxDecays];
  double d[kMaxDecays];
  double omd[kMaxDecays];
};

template <typename A>
__device__ __forceinline__ A decay_of(const Rates& r, int k) {
  if constexpr (sizeof(A) == 4) return r.f[k]; else return r.d[k];
}
template <typename A>
__device__ __forceinline__ A one_minus_decay_of(const Rates& r, int k) {
  if constexpr (sizeof(A) == 4) return r.omf[k]; else return r.omd[k];
}

// Updates elements [begin, end) of one tensor for every decay rate.
// row: [num_decays + 3] int64 = ema pointers (E*), param pointer (P*), numel, flags.
template <typename E, typename P, typename A>
__device__ void ema_window(const int64_t* row, int num_decays, const Rates& rates, int64_t begin, int64_t end,
                           bool aligned) {
  const P* param = reinterpret_cast<const P*>(row[num_decays]);
  if (aligned) {
    // begin is a multiple of kEmaChunk, so every vector access below stays 16-byte aligned.
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end; i += kThreads * kVec) {
      const Pack<P> p = load_pack(param + i);
      A x[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = to_acc<A>(p.v[j]);
      for (int k = 0; k < num_decays; ++k) {
        E* ema = reinterpret_cast<E*>(row[k]);
        const A d = decay_of<A>(rates, k);
        const A omd = one_minus_decay_of<A>(rates, k);
        Pack<E> e = load_pack(ema + i);
#pragma unroll
        for (int j = 0; j < kVec; ++j) e.v[j] = static_cast<E>(d * static_cast<A>(e.v[j]) + omd * x[j]);
        store_pack(ema + i, e);
      }
    }
    begin = vec_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const A x = to_acc<A>(param[i]);
    for (int k = 0; k < num_decays; ++k) {
      E* ema = reinterpret_cast<E*>(row[k]);
      ema[i] = static_cast<E>(decay_of<A>(rates, k) * static_cast<A>(ema[i]) + one_minus_decay_of<A>(rates, k) * x);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    ema_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int num_decays, bool fp64, Rates rates) {
  const int64_t width = num_decays + 3;
  const int64_t packed = table[num_tensors * width + blockIdx.x];
  const int64_t* row = table + (packed >> 32) * width;
  const int64_t begin = (packed & 0xffffffff) * kEmaChunk;
  const int64_t numel = row[num_decays + 1];
  const int64_t end = begin + kEmaChunk < numel ? begin + kEmaChunk : numel;
  const int64_t flags = row[num_decays + 2];
  const bool aligned = (flags & kAligned16) != 0;
  // The dtype switch is uniform across the block, so it costs no divergence.
  const bool bf16 = (flags & kParamIsBF16) != 0;
  if (flags & kEmaIsF64) {
    if (bf16) ema_window<double, BF16, double>(row, num_decays, rates, begin, end, aligned);
    else ema_window<double, float, double>(row, num_decays, rates, begin, end, aligned);
  } else if (fp64) {
    if (bf16) ema_window<float, BF16, double>(row, num_decays, rates, begin, end, aligned);
    else ema_window<float, float, double>(row, num_decays, rates, begin, end, aligned);
  } else {
    if (bf16) ema_window<float, BF16, float>(row, num_decays, rates, begin, end, aligned);
    else ema_window<float, float, float>(row, num_decays, rates, begin, end, aligned);
  }
}

// row: [4] int64 = dst pointer, src pointer, nbytes, flags.
__global__ void __launch_bounds__(kThreads) copy_kernel(const int64_t* __restrict__ table, int64_t num_tensors) {
  const int64_t packed = table[num_tensors * 4 + blockIdx.x];
  const int64_t* row = table + (packed >> 32) * 4;
  char* dst = reinterpret_cast<char*>(row[0]);
  const char* src = reinterpret_cast<const char*>(row[1]);
  int64_t begin = (packed & 0xffffffff) * kCopyChunk;
  const int64_t end = begin + kCopyChunk < row[2] ? begin + kCopyChunk : row[2];
  if (row[3] & kAligned16) {
    const int64_t vec_end = begin + (end - begin) / 16 * 16;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * 16; i < vec_end; i += kThreads * 16) {
      *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(src + i);
    }
    begin = vec_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) dst[i] = src[i];
}

// Pageable host -> device on the launch stream: ordered before the kernel that reads it, and the
// driver stages the bytes before returning, so the caller's vector may be freed right after.
void upload_table(int64_t* dev, const int64_t* host, int64_t len, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemcpyAsync(dev, host, static_cast<size_t>(len) * sizeof(int64_t), cudaMemcpyHostToDevice,
                                 stream));
}

}  // namespace

void launch_ema(const EmaArgs& args) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(args.device));
  Rates rates{};
  for (int k = 0; k < args.num_decays; ++k) {
    rates.f[k] = static_cast<float>(args.decays[k]);
    rates.omf[k] = static_cast<float>(1.0 - args.decays[k]);
    rates.d[k] = args.decays[k];
    rates.omd[k] = 1.0 - args.decays[k];
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(args.device));
  upload_table(args.table, args.host_table, args.table_len, stream);
  ema_kernel<<<static_cast<unsigned>(args.num_chunks), kThreads, 0, stream>>>(args.table, args.num_tensors,
                                                                              args.num_decays, args.fp64, rates);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_copy(const CopyArgs& args) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(args.device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(args.device));
  upload_table(args.table, args.host_table, args.table_len, stream);
  copy_kernel<<<static_cast<unsigned>(args.num_chunks), kThreads, 0, stream>>>(args.table, args.num_tensors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace soflow::cuda_impl
