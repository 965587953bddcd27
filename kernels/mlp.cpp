#include "mlp.h"
#include "packed.h"
#include "parts.h"
#include "pool.h"
#include "qdot_i8.h"
#include "qmm.h"
#include "rows.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

// chunk_fn(n0, n1) for chunks of W's rows over the pool (threads when the work is worth it).
template <typename F>
void matmul_chunks(const QWeight& W, const Acts& a, F&& chunk_fn) {
  const int chunk = row_chunk(W.N, pool().size());
  const double work = static_cast<double>(a.M) * W.N * W.K;
  pool().run((W.N + chunk - 1) / chunk, work >= 262144.0, [&](int c) {
    chunk_fn(c * chunk, std::min(W.N, (c + 1) * chunk));
  });
}

void run(
    const QWeight& G, const QWeight& U, const QWeight& Dn, bool gelu, const float* x, int M,
    float* y) {
  const int F = G.N;
  std::vector<float> h(static_cast<size_t>(M) * F);
  Acts ax;
  quantize_acts(x, M, G.K, G.bits, ax);
  // gate and up rows [n0, n1) together, so the activation runs on them while they are in cache.
  matmul_chunks(G, ax, [&](int n0, int n1) {
    const int width = n1 - n0;
    std::vector<float> g(static_cast<size_t>(M) * width), u(g.size());
    qdot_rows(G, ax, g.data(), width, n0, n1);
    qdot_rows(U, ax, u.data(), width, n0, n1);
    for (int m = 0; m < M; ++m) {
      (gelu ? gelu_tanh_mul : swiglu)(
          g.data() + m * width, u.data() + m * width, h.data() + m * F + n0, width);
    }
  });
  Acts ah;
  quantize_acts(h.data(), M, F, Dn.bits, ah);
  matmul_chunks(Dn, ah, [&](int n0, int n1) { qdot_rows(Dn, ah, y + n0, Dn.N, n0, n1); });
}

} // namespace

void mlp_residual_rows(
    const QWeight& G,
    const QWeight& U,
    const QWeight& Dn,
    bool gelu,
    const float* x,
    const float* nw,
    const float* post_nw,
    float eps,
    int M,
    float* y) {
  const int K = G.K;
  std::vector<float> xn(static_cast<size_t>(M) * K);
  for (int m = 0; m < M; ++m) {
    rms_norm_row(x + static_cast<size_t>(m) * K, nw, xn.data() + static_cast<size_t>(m) * K, K, eps);
  }
  run(G, U, Dn, gelu, xn.data(), M, y);
  if (post_nw != nullptr) {
    for (int m = 0; m < M; ++m) {
      float* r = y + static_cast<size_t>(m) * K;
      rms_norm_row(r, post_nw, r, K, eps);
    }
  }
  for (size_t i = 0; i < xn.size(); ++i) {
    y[i] = x[i] + y[i];
  }
}

namespace {

// The Mlp primitive's inputs after checking them: x as float32, then the three weights' arrays.
std::vector<mx::array> mlp_inputs(
    const mx::array& x,
    const mx::array& gate_w,
    const mx::array& gate_s,
    const mx::array& gate_b,
    const mx::array& up_w,
    const mx::array& up_s,
    const mx::array& up_b,
    int gu_bits,
    const mx::array& down_w,
    const mx::array& down_s,
    const mx::array& down_b,
    int down_bits) {
  const int K = check_weight("mlp (gate)", gate_w, gate_s, gate_b, gu_bits);
  check_weight("mlp (up)", up_w, up_s, up_b, gu_bits);
  const int F = check_weight("mlp (down)", down_w, down_s, down_b, down_bits);
  if (up_w.shape() != gate_w.shape() || up_s.dtype() != gate_s.dtype() || F != gate_w.shape(0) ||
      x.ndim() < 1 || x.shape(-1) != K) {
    throw std::invalid_argument(
        "mlp: gate and up [F, K] alike, down [D, F], x [..., K] (float32)");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  auto xf = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, s);
  return {xf, gate_w, gate_s, gate_b, up_w, up_s, up_b, down_w, down_s, down_b};
}

} // namespace

mx::array mlp(
    const mx::array& x,
    const mx::array& gate_w,
    const mx::array& gate_s,
    const mx::array& gate_b,
    const mx::array& up_w,
    const mx::array& up_s,
    const mx::array& up_b,
    int gu_bits,
    const mx::array& down_w,
    const mx::array& down_s,
    const mx::array& down_b,
    int down_bits,
    bool gelu) {
  auto inputs = mlp_inputs(x, gate_w, gate_s, gate_b, up_w, up_s, up_b, gu_bits, down_w, down_s,
                           down_b, down_bits);
  auto shape = x.shape();
  shape.back() = down_w.shape(0);
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(
      shape, mx::float32, std::make_shared<Mlp>(s, gu_bits, down_bits, gelu), std::move(inputs));
}

mx::array mlp_residual(
    const mx::array& h,
    const mx::array& norm_w,
    float eps,
    const mx::array& gate_w,
    const mx::array& gate_s,
    const mx::array& gate_b,
    const mx::array& up_w,
    const mx::array& up_s,
    const mx::array& up_b,
    int gu_bits,
    const mx::array& down_w,
    const mx::array& down_s,
    const mx::array& down_b,
    int down_bits,
    bool gelu,
    const std::optional<mx::array>& post_norm_w) {
  // The inputs alone: building an mlp() array to read them cost a second array a layer a step.
  auto inputs = mlp_inputs(h, gate_w, gate_s, gate_b, up_w, up_s, up_b, gu_bits, down_w, down_s,
                           down_b, down_bits);
  const int K = h.shape(-1);
  if (h.dtype() != mx::float32 || down_w.shape(0) != K || norm_w.dtype() != mx::float32 ||
      norm_w.ndim() != 1 || norm_w.shape(0) != K) {
    throw std::invalid_argument("mlp_residual: float32 h [..., D], down [D, F], norm weight [D]");
  }
  inputs.push_back(norm_w);
  if (post_norm_w) {
    if (post_norm_w->dtype() != mx::float32 || post_norm_w->shape() != norm_w.shape()) {
      throw std::invalid_argument("mlp_residual: float32 post norm weight [D]");
    }
    inputs.push_back(*post_norm_w);
  }
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(
      h.shape(),
      mx::float32,
      std::make_shared<Mlp>(s, gu_bits, down_bits, gelu, eps),
      std::move(inputs));
}

void Mlp::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  QWeight G = weight_of(inputs[1], inputs[2], gu_bits_);
  QWeight U = weight_of(inputs[4], inputs[5], gu_bits_);
  QWeight Dn = weight_of(inputs[7], inputs[8], down_bits_);
  const int M = static_cast<int>(inputs[0].size() / inputs[0].shape(-1));
  const bool residual = inputs.size() >= 11, post_norm = inputs.size() == 12;
  const bool gelu = gelu_;
  const float eps = eps_;
  enc.dispatch([=, y = out.data<float>(), arrs = weak_copies(inputs)]() mutable {
    std::vector<std::vector<char>> tmp;
    const auto p = row_major(arrs, tmp);
    QWeight* ws[3] = {&G, &U, &Dn};
    for (int i = 0; i < 3; ++i) {
      ws[i]->w = static_cast<const uint8_t*>(p[1 + 3 * i]);
      ws[i]->scales = p[2 + 3 * i];
      ws[i]->biases = p[3 + 3 * i];
    }
    const float* x = static_cast<const float*>(p[0]);
    if (!residual) {
      run(G, U, Dn, gelu, x, M, y);
      return;
    }
    mlp_residual_rows(
        G, U, Dn, gelu, x, static_cast<const float*>(p[10]),
        post_norm ? static_cast<const float*>(p[11]) : nullptr, eps, M, y);
  });
}

void Mlp::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdMlp runs on the CPU only");
}

} // namespace mlxd
