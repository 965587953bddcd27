// Block-quantized matmul on the CPU as an MLX primitive (the kernels are in qdot.cpp).
#include "qmm.h"
#include "packed.h"
#include "parts.h"
#include "pool.h"
#include "qdot.h"
#include "qdot_i8.h"
#include "rows.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

void qmm_rows(const QWeight& W, const float* x, int M, float* y) {
  Acts a;
  quantize_acts(x, M, W.K, W.bits, a);
  // Below ~256k multiply-adds a second thread costs more than it saves.
  const double work = static_cast<double>(M) * W.N * W.K;
  const int chunk = row_chunk(W.N, pool().size());
  pool().run((W.N + chunk - 1) / chunk, work >= 262144.0, [&](int c) {
    const int n0 = c * chunk, n1 = std::min(W.N, n0 + chunk);
    qdot_rows(W, a, y + n0, W.N, n0, n1);
  });
}

namespace {

void run_dequant(const QWeight& W, float* out) {
  // On the calling thread only: the BLAS call that follows runs its own threads, and a worker of
  // ours still spinning would take a core from it.
  const int chunk = 64;
  pool().run((W.N + chunk - 1) / chunk, false, [&](int c) {
    dequant_rows(W, out, c * chunk, std::min(W.N, (c + 1) * chunk));
  });
}

SType stype_of(const mx::array& a) {
  switch (a.dtype()) {
    case mx::float32:
      return SType::F32;
    case mx::float16:
      return SType::F16;
    default:
      return SType::BF16;
  }
}

} // namespace

int check_weight(
    const char* what,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits) {
  const std::string name(what);
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument(name + ": bits must be 4 or 8");
  }
  const auto t = scales.dtype();
  if (t != mx::float32 && t != mx::float16 && t != mx::bfloat16) {
    throw std::invalid_argument(name + ": scales and biases must be float32, float16 or bfloat16");
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || scales.ndim() != 2 ||
      scales.shape() != biases.shape() || scales.dtype() != biases.dtype() ||
      scales.shape(0) != w.shape(0) || scales.shape(1) * kGroup != w.shape(1) * 32 / bits) {
    throw std::invalid_argument(
        name + ": w must be uint32 [N, K*bits/32], scales/biases [N, K/32] (group size 32)");
  }
  return w.shape(1) * 32 / bits;
}

QWeight weight_of(const mx::array& w, const mx::array& scales, int bits) {
  const int K = w.shape(1) * 32 / bits;
  return {nullptr, nullptr, nullptr, stype_of(scales), w.shape(0), K, bits};
}

int num_threads() {
  return pool().size();
}

void set_num_threads(int n) {
  pool().resize(n);
}

mx::array qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits) {
  const int K = check_weight("qmm", w, scales, biases, bits);
  if (x.ndim() < 1 || x.shape(-1) != K) {
    throw std::invalid_argument("qmm: x [..., K] does not match w's K");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  auto xf = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, s);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(
      shape, mx::float32, std::make_shared<QMatmul>(s, bits), {xf, w, scales, biases});
}

mx::array qmm_add(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    const mx::array& residual,
    const std::optional<mx::array>& norm_w,
    float eps) {
  const int K = check_weight("qmm_add", w, scales, biases, bits);
  auto shape = x.shape();
  if (x.ndim() < 1 || x.shape(-1) != K) {
    throw std::invalid_argument("qmm_add: x [..., K] does not match w's K");
  }
  shape.back() = w.shape(0);
  if (residual.dtype() != mx::float32 || residual.shape() != shape) {
    throw std::invalid_argument("qmm_add: float32 residual of the output's shape");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  auto xf = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, s);
  std::vector<mx::array> inputs = {xf, w, scales, biases, residual};
  if (norm_w) {
    if (norm_w->dtype() != mx::float32 || norm_w->ndim() != 1 || norm_w->shape(0) != w.shape(0)) {
      throw std::invalid_argument("qmm_add: float32 norm weight [N]");
    }
    inputs.push_back(*norm_w);
  }
  return mx::array(
      shape, mx::float32, std::make_shared<QMatmul>(s, bits, eps), std::move(inputs));
}

mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits) {
  const int K = check_weight("dequantize", w, scales, biases, bits);
  auto s = mx::default_stream(mx::Device::cpu);
  // A QMatmul with no x: its eval dequantizes (the primitive knows by its input count).
  return mx::array(
      {w.shape(0), K}, mx::float32, std::make_shared<QMatmul>(s, bits), {w, scales, biases});
}

void QMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  // dequantize(w, scales, biases): no x; qmm_add: the residual (then the norm weight) last.
  const bool dequant = inputs.size() == 3;
  const bool add = inputs.size() >= 5, norm = inputs.size() == 6;
  const float eps = eps_;
  const int o = dequant ? 0 : 1; // where w sits
  QWeight W = weight_of(inputs[o], inputs[o + 1], bits_);
  const int M = dequant ? 0 : static_cast<int>(inputs[0].size() / inputs[0].shape(-1));
  enc.dispatch([W, M, o, add, norm, eps, y = out.data<float>(), arrs = weak_copies(inputs)]() mutable {
    std::vector<std::vector<char>> tmp;
    const auto ptrs = row_major(arrs, tmp);
    W.w = static_cast<const uint8_t*>(ptrs[o]);
    W.scales = ptrs[o + 1];
    W.biases = ptrs[o + 2];
    if (o == 0) {
      run_dequant(W, y);
    } else {
      qmm_rows(W, static_cast<const float*>(ptrs[0]), M, y);
    }
    if (norm) {
      for (int m = 0; m < M; ++m) {
        float* r = y + static_cast<size_t>(m) * W.N;
        rms_norm_row(r, static_cast<const float*>(ptrs[5]), r, W.N, eps);
      }
    }
    if (add) {
      const float* r = static_cast<const float*>(ptrs[4]);
      for (size_t i = 0; i < static_cast<size_t>(M) * W.N; ++i) {
        y[i] = r[i] + y[i];
      }
    }
  });
}

void QMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdQMatmul runs on the CPU only; use mx.quantized_matmul on GPUs");
}

} // namespace mlxd
