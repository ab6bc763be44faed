// C++ test of the EMA entry points (run by ctest): the kernels against a float64 reference, the fused
// multi-decay pass against single calls, the buffer copy, and the argument errors. It needs no
// Python, so a kernel bug shows up here before any binding is involved.
#include <ATen/ATen.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "ema.h"

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Whether f throws E with `needle` in its message.
template <typename E>
void expect_throw(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
  } catch (const E& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           what + ": message '" + e.what() + "' lacks '" + needle + "'");
    return;
  } catch (const std::exception& e) {
    expect(false, what + ": wrong exception type: " + e.what());
    return;
  }
  expect(false, what + ": nothing thrown");
}

// Largest |out - exact| / (eps * (decay|e| + (1-decay)|p|)): the error in units of the rounding scale.
double scaled_error(const at::Tensor& out, const at::Tensor& ema, const at::Tensor& param, double decay, double eps) {
  const at::Tensor e = ema.to(at::kDouble), p = param.to(at::kDouble);
  const at::Tensor exact = decay * e + (1.0 - decay) * p;
  const at::Tensor terms = decay * e.abs() + (1.0 - decay) * p.abs() + 1e-300;
  return ((out.to(at::kDouble) - exact).abs() / (eps * terms)).max().item<double>();
}

std::vector<int64_t> sizes() { return {1, 2, 7, 8, 9, 1023, 1025, 65537, 1 << 20, 3}; }

void test_single_decay(at::ScalarType param_dtype, at::ScalarType ema_dtype, bool fp64) {
  std::vector<at::Tensor> emas, params, before;
  for (int64_t n : sizes()) {
    params.push_back(at::randn({n}).to(param_dtype));
    emas.push_back(at::randn({n}).to(ema_dtype));
    before.push_back(emas.back().clone());
  }
  soflow::ema_update_(emas, params, 0.999, fp64);
  const double eps = ema_dtype == at::kDouble ? 2.220446049250313e-16 : 1.1920928955078125e-07;
  for (size_t i = 0; i < emas.size(); ++i) {
    const double err = scaled_error(emas[i], before[i], params[i], 0.999, eps);
    expect(err <= 3.0, "single decay, " + std::string(c10::toString(param_dtype)) + " params, tensor " +
                           std::to_string(i) + ": error " + std::to_string(err) + " eps");
  }
}

void test_multi_decay() {
  const std::vector<double> decays{0.9999, 0.99, 0.5};
  std::vector<at::Tensor> params;
  for (int64_t n : sizes()) params.push_back(at::randn({n}).to(n % 2 ? at::kBFloat16 : at::kFloat));
  std::vector<std::vector<at::Tensor>> fused(decays.size()), single(decays.size());
  for (size_t k = 0; k < decays.size(); ++k) {
    for (const auto& p : params) {
      fused[k].push_back(at::randn(p.sizes()));
      single[k].push_back(fused[k].back().clone());
    }
  }
  soflow::ema_update_multi_(fused, params, decays, false);
  for (size_t k = 0; k < decays.size(); ++k) {
    soflow::ema_update_(single[k], params, decays[k], false);
    for (size_t i = 0; i < params.size(); ++i) {
      expect(at::equal(fused[k][i], single[k][i]), "multi decay " + std::to_string(k) + " tensor " +
                                                       std::to_string(i) + " differs from a single call");
    }
  }
}

void test_copy_and_empty() {
  std::vector<at::Tensor> src{at::arange(5, at::kLong), at::randn({70001}), at::empty({0})};
  std::vector<at::Tensor> dst{at::zeros({5}, at::kLong), at::zeros({70001}), at::empty({0})};
  soflow::copy_(dst, src);
  for (size_t i = 0; i < src.size(); ++i) expect(at::equal(dst[i], src[i]), "copy_ tensor " + std::to_string(i));
  soflow::ema_update_({}, {}, 0.5, false);
  soflow::copy_({}, {});
}

void test_errors() {
  const at::Tensor e = at::zeros({3}), p = at::zeros({3});
  expect_throw<std::invalid_argument>([&] { soflow::ema_update_({e}, {p, p}, 0.9, false); },
                                      "got 1 tensors in emas and 2 in params", "length mismatch");
  expect_throw<std::invalid_argument>([&] { soflow::ema_update_({e}, {at::zeros({4})}, 0.9, false); },
                                      "emas[0] has shape [3] but params[0] has shape [4]", "shape mismatch");
  const at::Tensor transposed = at::zeros({3, 2}).t();
  expect_throw<std::invalid_argument>([&] { soflow::ema_update_({transposed}, {at::zeros({2, 3})}, 0.9, false); },
                                      "emas[0] is not contiguous", "layout");
  expect_throw<soflow::ArgTypeError>([&] { soflow::ema_update_({e}, {p.to(at::kHalf)}, 0.9, false); },
                                     "params[0] has dtype torch.float16", "param dtype");
  expect_throw<std::invalid_argument>([&] { soflow::ema_update_({e}, {p}, -0.1, false); },
                                      "decay must be a finite number in [0, 1]", "decay range");
  expect_throw<soflow::ArgTypeError>([&] { soflow::copy_({at::zeros({3}, at::kDouble)}, {p}); },
                                     "copy_ does not convert dtypes", "copy dtype");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const std::string isa : {"default", "avx2"}) {
    if (isa == "avx2") {
      try {
        soflow::set_cpu_isa("avx2");
      } catch (const std::invalid_argument&) {
        std::printf("skip: no AVX2+FMA kernels on this CPU\n");
        continue;
      }
    } else {
      soflow::set_cpu_isa(isa);
    }
    test_single_decay(at::kFloat, at::kFloat, false);
    test_single_decay(at::kBFloat16, at::kFloat, false);
    test_single_decay(at::kFloat, at::kFloat, true);
    test_single_decay(at::kBFloat16, at::kDouble, false);
    test_multi_decay();
  }
  test_copy_and_empty();
  test_errors();
  std::printf("%s: %d failure(s); cuda_built=%d\n", g_failures ? "FAILED" : "OK", g_failures,
              static_cast<int>(soflow::cuda_built()));
  return g_failures ? 1 : 0;
}
