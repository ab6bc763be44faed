// Multi-tensor EMA update and buffer copy: argument checks, the CPU path, and the host half of
// the CUDA path (which only builds a pointer table and calls into ema_cuda.cu).
#include "ema.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

// Baseline copy of the CPU kernels, compiled for the ISA of the build flags.
#define SOFLOW_KERNEL_NS base
#include "ema_cpu_kernels.h"
#undef SOFLOW_KERNEL_NS

// A second copy for AVX2+FMA, picked at run time, so that a portable build still runs 256-bit code.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SOFLOW_HAVE_AVX2_COPY 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define SOFLOW_KERNEL_NS avx2
#include "ema_cpu_kernels.h"
#undef SOFLOW_KERNEL_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace soflow {

namespace {

// ------------------------------------------------------------------------------ argument checks

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Messages are assembled from strings and std::to_string, never through iostreams. Built with a
// GCC whose libstdc++ is newer than the one the process loads (seen: /opt/gcc on an H100 image,
// torch 2.11), the extension crashed inside std::ostream's number formatting on its first call;
// and the names built for every tensor of every call made that formatting a hot path besides.
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(const char* s) { return s; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}
inline std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string piece(const at::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(a[i]);
  }
  return out + "]";
}

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (out += ... += piece(parts));
  return out;
}

// Validates one tensor of a call and returns its device-independent description for later checks.
// `where` reads like "emas_per_decay[1][3]" so the message points at the exact list element.
void check_tensor(const std::string& op, const std::string& where, const at::Tensor& t,
                  const at::Device& device, const std::string& device_owner) {
  if (!t.defined()) throw std::invalid_argument(cat(op, ": ", where, " is an undefined tensor"));
  // Wrapper subclasses such as DTensor carry no storage of their own; under FSDP2 the caller must
  // hand over the local shard, which is exactly what the EMA works on.
  if (t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) {
    throw ArgTypeError(cat(op, ": ", where, " is a tensor subclass (e.g. a DTensor); pass its local shard, "
                           "p.to_local(), instead"));
  }
  if (!t.is_cpu() && !t.is_cuda()) {
    throw ArgTypeError(cat(op, ": ", where, " is on ", t.device(), "; only cpu and cuda tensors are supported"));
  }
  if (t.device() != device) {
    throw ArgTypeError(cat(op, ": ", where, " is on ", t.device(), " but ", device_owner, " is on ", device,
                           "; all tensors of one call must be on the same device"));
  }
  if (!t.is_contiguous()) {
    throw std::invalid_argument(cat(op, ": ", where, " is not contiguous (shape ", t.sizes(), ", strides ",
                                    t.strides(), "); pass .contiguous() tensors"));
  }
}

void check_decay(const std::string& op, double decay) {
  if (!std::isfinite(decay) || decay < 0.0 || decay > 1.0) {
    throw std::invalid_argument(cat(op, ": decay must be a finite number in [0, 1], got ", decay));
  }
}

// ------------------------------------------------------------------------------ CPU driver

// Runs f(tensor_index, begin, end) over the concatenation of all tensors, split evenly between the
// intra-op threads. Splitting the flat element range (not tensor by tensor) opens one parallel
// region per call however many tensors there are, and keeps the small bias vectors from leaving
// threads idle. `offsets` is the prefix sum of tensor sizes, offsets[0] = 0.
template <typename F>
void for_each_span(const std::vector<int64_t>& offsets, int64_t grain, const F& f) {
  const int64_t total = offsets.back();
  if (total == 0) return;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    auto t = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1);
    for (; t + 1 < offsets.size() && offsets[t] < end; ++t) {
      const int64_t lo = std::max(begin, offsets[t]) - offsets[t];
      const int64_t hi = std::min(end, offsets[t + 1]) - offsets[t];
      if (hi > lo) f(t, lo, hi);
    }
  });
}

// Below ~32k elements a second thread costs more to wake than it saves (ATen uses the same grain).
constexpr int64_t kGrainElements = 32768;
constexpr int64_t kGrainBytes = 256 * 1024;

bool cpu_has_avx2() {
#ifdef SOFLOW_HAVE_AVX2_COPY
  static const bool has = [] {
    __builtin_cpu_init();
    // ATEN_CPU_CAPABILITY=default is torch's switch for "no vector extensions"; honour it too.
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::string(cap) == "default") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// Tests flip this to cover both kernel copies on one machine.
bool g_use_avx2 = cpu_has_avx2();

struct Row {
  void* ema[kMaxDecays];
  const void* param;
  bool param_bf16;
};

template <typename E, typename A>
void ema_cpu(const std::vector<Row>& rows, const std::vector<int64_t>& offsets, int num_decays,
             const std::vector<double>& decays) {
  A d[kMaxDecays];
  A omd[kMaxDecays];
  for (int k = 0; k < num_decays; ++k) {
    d[k] = static_cast<A>(decays[k]);
    // 1 - decay is formed in double and rounded once, as `alpha=1 - d` is in the PyTorch loop.
    omd[k] = static_cast<A>(1.0 - decays[k]);
  }
  const bool avx2 = g_use_avx2;
  for_each_span(offsets, kGrainElements, [&](size_t t, int64_t lo, int64_t hi) {
    const Row& row = rows[t];
    E* emas[kMaxDecays];
    for (int k = 0; k < num_decays; ++k) emas[k] = static_cast<E*>(row.ema[k]) + lo;
    const int64_t n = hi - lo;
    auto run = [&](auto* param) {
      using P = std::remove_const_t<std::remove_pointer_t<decltype(param)>>;
#ifdef SOFLOW_HAVE_AVX2_COPY
      if (avx2) return cpu::avx2::ema_span<E, P, A>(emas, param + lo, n, num_decays, d, omd);
#endif
      (void)avx2;
      cpu::base::ema_span<E, P, A>(emas, param + lo, n, num_decays, d, omd);
    };
    if (row.param_bf16) {
      run(static_cast<const uint16_t*>(row.param));
    } else {
      run(static_cast<const float*>(row.param));
    }
  });
}

#ifdef SOFLOW_WITH_CUDA
// Device buffer for a pointer table, from the caching allocator on the current stream (the
// kernel that reads it runs on that stream, so the block is safe to reuse once it is freed).
at::Tensor device_table(int64_t size, const at::Device& device) {
  return at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
}

// Pointer table for one EMA launch; layout in ema_launch.h. Built in ordinary host memory (a few
// KB); launch_ema copies it in on the stream just before the kernel.
void ema_cuda(const std::vector<Row>& rows, const std::vector<int64_t>& numels, bool ema_f64, int num_decays,
              const std::vector<double>& decays, bool fp64, const at::Device& device) {
  using namespace cuda_impl;
  const int64_t num_tensors = static_cast<int64_t>(rows.size());
  const int64_t width = num_decays + 3;
  int64_t num_chunks = 0;
  for (int64_t n : numels) num_chunks += (n + kEmaChunk - 1) / kEmaChunk;
  if (num_chunks == 0) return;
  std::vector<int64_t> host(static_cast<size_t>(num_tensors * width + num_chunks));
  int64_t* table = host.data();
  int64_t* chunk = table + num_tensors * width;
  for (int64_t t = 0; t < num_tensors; ++t) {
    int64_t* row = table + t * width;
    bool aligned = reinterpret_cast<uintptr_t>(rows[t].param) % 16 == 0;
    for (int k = 0; k < num_decays; ++k) {
      row[k] = reinterpret_cast<int64_t>(rows[t].ema[k]);
      aligned = aligned && reinterpret_cast<uintptr_t>(rows[t].ema[k]) % 16 == 0;
    }
    row[num_decays] = reinterpret_cast<int64_t>(rows[t].param);
    row[num_decays + 1] = numels[t];
    row[num_decays + 2] =
        (ema_f64 ? kEmaIsF64 : 0) | (rows[t].param_bf16 ? kParamIsBF16 : 0) | (aligned ? kAligned16 : 0);
    for (int64_t c = 0; c * kEmaChunk < numels[t]; ++c) *chunk++ = (t << 32) | c;
  }
  at::Tensor dev = device_table(static_cast<int64_t>(host.size()), device);
  EmaArgs args{dev.data_ptr<int64_t>(), host.data(), static_cast<int64_t>(host.size()), num_tensors, num_chunks,
               num_decays, fp64, {}, device.index()};
  for (int k = 0; k < num_decays; ++k) args.decays[k] = decays[k];
  launch_ema(args);
}
#endif

#ifndef SOFLOW_WITH_CUDA
[[noreturn]] void no_cuda(const std::string& op) {
  throw std::runtime_error(cat(op, ": got CUDA tensors, but soflow_fast._C was built without its CUDA part "
                               "(SOFLOW_NO_CUDA=1, no nvcc, or a CPU-only torch at build time). Reinstall with nvcc "
                               "available, or use soflow_fast.ema.EMA, which falls back to torch._foreach_lerp_."));
}
#endif

// Shared body of ema_update_ and ema_update_multi_. `names[k]` is how list k is called in messages.
void ema_impl(const std::string& op, const std::vector<const std::vector<at::Tensor>*>& emas,
              const std::vector<std::string>& names, const std::vector<at::Tensor>& params,
              const std::vector<double>& decays, bool fp64) {
  const int num_decays = static_cast<int>(decays.size());
  if (num_decays == 0) throw std::invalid_argument(cat(op, ": decays is empty; pass at least one decay rate"));
  if (num_decays > kMaxDecays) {
    throw std::invalid_argument(cat(op, ": got ", num_decays, " decay rates; at most ", kMaxDecays, " per call"));
  }
  for (double d : decays) check_decay(op, d);
  for (int k = 0; k < num_decays; ++k) {
    if (emas[k]->size() != params.size()) {
      throw std::invalid_argument(cat(op, ": got ", emas[k]->size(), " tensors in ", names[k], " and ",
                                      params.size(), " in params; pass one EMA buffer per parameter"));
    }
  }
  if (params.empty()) return;

  const at::Device device = params[0].defined() ? params[0].device() : at::Device(at::kCPU);
  const at::ScalarType ema_dtype = (*emas[0])[0].defined() ? (*emas[0])[0].scalar_type() : at::kFloat;
  const std::string ema0 = names[0] + "[0]";
  std::vector<Row> rows;
  std::vector<int64_t> numels;
  std::vector<int64_t> offsets{0};
  rows.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const std::string pname = cat("params[", i, "]");
    check_tensor(op, pname, p, device, "params[0]");
    if (p.scalar_type() != at::kFloat && p.scalar_type() != at::kBFloat16) {
      throw ArgTypeError(cat(op, ": ", pname, " has dtype ", dtype_name(p.scalar_type()),
                             "; parameters must be torch.float32 or torch.bfloat16"));
    }
    Row row{};
    row.param = p.data_ptr();
    row.param_bf16 = p.scalar_type() == at::kBFloat16;
    for (int k = 0; k < num_decays; ++k) {
      const at::Tensor& e = (*emas[k])[i];
      const std::string ename = cat(names[k], "[", i, "]");
      check_tensor(op, ename, e, device, "params[0]");
      if (e.scalar_type() != at::kFloat && e.scalar_type() != at::kDouble) {
        throw ArgTypeError(cat(op, ": ", ename, " has dtype ", dtype_name(e.scalar_type()),
                               "; EMA buffers must be torch.float32 or torch.float64"));
      }
      if (e.scalar_type() != ema_dtype) {
        throw ArgTypeError(cat(op, ": ", ename, " has dtype ", dtype_name(e.scalar_type()), " but ", ema0, " has ",
                               dtype_name(ema_dtype), "; all EMA buffers of one call must share a dtype"));
      }
      if (e.sizes() != p.sizes()) {
        throw std::invalid_argument(cat(op, ": ", ename, " has shape ", e.sizes(), " but ", pname, " has shape ",
                                        p.sizes()));
      }
      row.ema[k] = e.data_ptr();
    }
    if (p.numel() == 0) continue;  // empty FSDP shards: nothing to do, and their data_ptr may be null
    rows.push_back(row);
    numels.push_back(p.numel());
    offsets.push_back(offsets.back() + p.numel());
  }

  const bool ema_f64 = ema_dtype == at::kDouble;
  if (device.is_cuda()) {
#ifdef SOFLOW_WITH_CUDA
    return ema_cuda(rows, numels, ema_f64, num_decays, decays, fp64, device);
#else
    no_cuda(op);
#endif
  }
  if (ema_f64) {
    ema_cpu<double, double>(rows, offsets, num_decays, decays);
  } else if (fp64) {
    ema_cpu<float, double>(rows, offsets, num_decays, decays);
  } else {
    ema_cpu<float, float>(rows, offsets, num_decays, decays);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ public entry points

void ema_update_(const std::vector<at::Tensor>& emas, const std::vector<at::Tensor>& params, double decay,
                 bool fp64) {
  ema_impl("ema_update_", {&emas}, {"emas"}, params, {decay}, fp64);
}

void ema_update_multi_(const std::vector<std::vector<at::Tensor>>& emas_per_decay,
                       const std::vector<at::Tensor>& params, const std::vector<double>& decays, bool fp64) {
  const std::string op = "ema_update_multi_";
  if (emas_per_decay.size() != decays.size()) {
    throw std::invalid_argument(cat(op, ": got ", emas_per_decay.size(), " EMA lists but ", decays.size(),
                                    " decays; pass one list of EMA buffers per decay rate"));
  }
  std::vector<const std::vector<at::Tensor>*> lists;
  std::vector<std::string> names;
  for (size_t k = 0; k < emas_per_decay.size(); ++k) {
    lists.push_back(&emas_per_decay[k]);
    names.push_back(cat("emas_per_decay[", k, "]"));
  }
  ema_impl(op, lists, names, params, decays, fp64);
}

void copy_(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  const std::string op = "copy_";
  if (dst.size() != src.size()) {
    throw std::invalid_argument(cat(op, ": got ", dst.size(), " destination and ", src.size(),
                                    " source tensors; the lists must pair up one to one"));
  }
  if (dst.empty()) return;
  const at::Device device = src[0].defined() ? src[0].device() : at::Device(at::kCPU);
  std::vector<std::pair<void*, const void*>> spans;
  std::vector<int64_t> sizes;
  std::vector<int64_t> offsets{0};
  for (size_t i = 0; i < dst.size(); ++i) {
    const std::string dname = cat("dst[", i, "]");
    const std::string sname = cat("src[", i, "]");
    check_tensor(op, sname, src[i], device, "src[0]");
    check_tensor(op, dname, dst[i], device, "src[0]");
    if (dst[i].scalar_type() != src[i].scalar_type()) {
      throw ArgTypeError(cat(op, ": ", dname, " has dtype ", dtype_name(dst[i].scalar_type()), " but ", sname,
                             " has ", dtype_name(src[i].scalar_type()), "; copy_ does not convert dtypes"));
    }
    if (dst[i].sizes() != src[i].sizes()) {
      throw std::invalid_argument(cat(op, ": ", dname, " has shape ", dst[i].sizes(), " but ", sname,
                                      " has shape ", src[i].sizes()));
    }
    const int64_t nbytes = static_cast<int64_t>(src[i].nbytes());
    if (nbytes == 0) continue;
    spans.emplace_back(dst[i].data_ptr(), src[i].data_ptr());
    sizes.push_back(nbytes);
    offsets.push_back(offsets.back() + nbytes);
  }
  if (device.is_cuda()) {
#ifdef SOFLOW_WITH_CUDA
    using namespace cuda_impl;
    const auto num_tensors = static_cast<int64_t>(spans.size());
    int64_t num_chunks = 0;
    for (int64_t n : sizes) num_chunks += (n + kCopyChunk - 1) / kCopyChunk;
    if (num_chunks == 0) return;
    std::vector<int64_t> host(static_cast<size_t>(num_tensors * 4 + num_chunks));
    int64_t* table = host.data();
    int64_t* chunk = table + num_tensors * 4;
    for (int64_t t = 0; t < num_tensors; ++t) {
      const auto dst_ptr = reinterpret_cast<uintptr_t>(spans[t].first);
      const auto src_ptr = reinterpret_cast<uintptr_t>(spans[t].second);
      table[t * 4 + 0] = static_cast<int64_t>(dst_ptr);
      table[t * 4 + 1] = static_cast<int64_t>(src_ptr);
      table[t * 4 + 2] = sizes[t];
      table[t * 4 + 3] = (dst_ptr % 16 == 0 && src_ptr % 16 == 0) ? kAligned16 : 0;
      for (int64_t c = 0; c * kCopyChunk < sizes[t]; ++c) *chunk++ = (t << 32) | c;
    }
    at::Tensor dev = device_table(static_cast<int64_t>(host.size()), device);
    launch_copy(CopyArgs{dev.data_ptr<int64_t>(), host.data(), static_cast<int64_t>(host.size()), num_tensors,
                         num_chunks, device.index()});
    return;
#else
    no_cuda(op);
#endif
  }
  for_each_span(offsets, kGrainBytes, [&](size_t t, int64_t lo, int64_t hi) {
    std::memcpy(static_cast<char*>(spans[t].first) + lo, static_cast<const char*>(spans[t].second) + lo,
                static_cast<size_t>(hi - lo));
  });
}

bool cuda_built() {
#ifdef SOFLOW_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() { return g_use_avx2 ? "avx2" : "default"; }

void set_cpu_isa(const std::string& isa) {
  if (isa == "default") {
    g_use_avx2 = false;
  } else if (isa == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("set_cpu_isa: this CPU (or build) has no AVX2+FMA kernels");
    g_use_avx2 = true;
  } else {
    throw std::invalid_argument(cat("set_cpu_isa: unknown ISA '", isa, "'; use 'default' or 'avx2'"));
  }
}

}  // namespace soflow
