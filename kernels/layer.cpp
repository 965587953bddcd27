#include "layer.h"
#include "packed.h"
#include "parts.h"
#include "pool.h"
#include "qdot_i8.h"
#include "qmm.h"
#include "rows.h"

#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

struct Task { // rows [n0, n1) of weight w
  int w, n0, n1;
};

// y_i = xn @ dequantize(W_i)^T for the three weights; their row chunks go to the pool together
// (k and v alone are too small to be worth a second thread).
void project(const QWeight* W, const Acts& a, float* const* y) {
  std::vector<Task> tasks;
  double work = 0.0;
  for (int i = 0; i < 3; ++i) {
    const int chunk = row_chunk(W[i].N, pool().size());
    for (int n0 = 0; n0 < W[i].N; n0 += chunk) {
      tasks.push_back({i, n0, std::min(W[i].N, n0 + chunk)});
    }
    work += static_cast<double>(a.M) * W[i].N * W[i].K;
  }
  pool().run(static_cast<int>(tasks.size()), work >= 262144.0, [&](int c) {
    const Task& t = tasks[c];
    qdot_rows(W[t.w], a, y[t.w] + t.n0, W[t.w].N, t.n0, t.n1);
  });
}

} // namespace

void attn_in_rows(
    const QWeight* W,
    const float* x,
    const float* nw,
    float eps,
    int B,
    int Hq,
    int Hk,
    const int32_t* off,
    bool per_row,
    const float* qn,
    const float* kn,
    const float* const* bias,
    const RopeArgs& rope,
    float* const* ys) {
  const int K = W[0].K, D = W[0].N / Hq, dims = rope.dims;
  const bool trad = rope.traditional;
  std::vector<float> xn(static_cast<size_t>(B) * K);
  for (int b = 0; b < B; ++b) {
    rms_norm_row(x + static_cast<size_t>(b) * K, nw, xn.data() + static_cast<size_t>(b) * K, K, eps);
  }
  Acts a;
  quantize_acts(xn.data(), B, K, W[0].bits, a);
  project(W, a, ys);
  if (bias != nullptr) { // the unfused layer's `qmm(x) + bias`, the same float adds
    for (int i = 0; i < 3; ++i) {
      for (int b = 0; b < B; ++b) {
        float* y = ys[i] + static_cast<size_t>(b) * W[i].N;
        for (int n = 0; n < W[i].N; ++n) {
          y[n] += bias[i][n];
        }
      }
    }
  }
  const std::vector<float> inv = rope_inv_freqs(rope.base, dims);
  std::vector<float> cs(inv.size()), sn(inv.size());
  for (int b = 0; b < B; ++b) {
    rope_angles(static_cast<float>(off[per_row ? b : 0]) * rope.scale, inv, cs.data(), sn.data());
    for (int h = 0; h < Hq; ++h) {
      float* r = ys[0] + (static_cast<size_t>(b) * Hq + h) * D;
      if (qn) {
        rms_norm_row(r, qn, r, D, eps);
      }
      rope_head(r, r, cs.data(), sn.data(), dims, D, trad);
    }
    for (int h = 0; h < Hk; ++h) {
      float* r = ys[1] + (static_cast<size_t>(b) * Hk + h) * D;
      if (kn) {
        rms_norm_row(r, kn, r, D, eps);
      }
      rope_head(r, r, cs.data(), sn.data(), dims, D, trad);
    }
  }
}

std::vector<mx::array> attn_in(
    const mx::array& x,
    const mx::array& norm_w,
    float eps,
    const mx::array& q_w,
    const mx::array& q_s,
    const mx::array& q_b,
    const mx::array& k_w,
    const mx::array& k_s,
    const mx::array& k_b,
    const mx::array& v_w,
    const mx::array& v_s,
    const mx::array& v_b,
    int bits,
    const mx::array& offset,
    int n_heads,
    int n_kv_heads,
    int dims,
    bool traditional,
    float base,
    float scale,
    const std::optional<mx::array>& q_norm_w,
    const std::optional<mx::array>& k_norm_w,
    const std::optional<mx::array>& q_bias,
    const std::optional<mx::array>& k_bias,
    const std::optional<mx::array>& v_bias) {
  const int K = check_weight("attn_in (q)", q_w, q_s, q_b, bits);
  if (check_weight("attn_in (k)", k_w, k_s, k_b, bits) != K ||
      check_weight("attn_in (v)", v_w, v_s, v_b, bits) != K) {
    throw std::invalid_argument("attn_in: q, k and v weights of one input size K");
  }
  const int B = x.ndim() == 3 ? x.shape(0) : 0;
  if (x.dtype() != mx::float32 || x.ndim() != 3 || x.shape(1) != 1 || x.shape(2) != K ||
      norm_w.dtype() != mx::float32 || norm_w.ndim() != 1 || norm_w.shape(0) != K) {
    throw std::invalid_argument("attn_in: float32 x [B, 1, K] and norm weight [K]");
  }
  if (n_heads < 1 || n_kv_heads < 1 || q_w.shape(0) % n_heads || k_w.shape(0) % n_kv_heads ||
      v_w.shape(0) % n_kv_heads || q_w.shape(0) / n_heads != k_w.shape(0) / n_kv_heads) {
    throw std::invalid_argument("attn_in: q [Hq * D, K], k [Hk * D, K], v [Hk * Dv, K]");
  }
  const int D = q_w.shape(0) / n_heads, Dv = v_w.shape(0) / n_kv_heads;
  if (dims % 2 || dims > D || (offset.size() != 1 && offset.size() != static_cast<size_t>(B))) {
    throw std::invalid_argument("attn_in: even RoPE dims <= D, offset [B] or [1]");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  // A batch cache's offset is int32 [B] already: no reshape node for it (one a layer a step).
  auto off = offset.ndim() == 1 ? offset : mx::reshape(offset, {-1}, s);
  off = mx::astype(off, mx::int32, s);
  std::vector<mx::array> inputs = {x, norm_w, q_w, q_s, q_b, k_w, k_s, k_b, v_w, v_s, v_b, off};
  if (q_norm_w.has_value() != k_norm_w.has_value()) {
    throw std::invalid_argument("attn_in: q and k norm weights both or neither");
  }
  if (q_norm_w) {
    for (const auto* w : {&*q_norm_w, &*k_norm_w}) {
      if (w->dtype() != mx::float32 || w->ndim() != 1 || w->shape(0) != D) {
        throw std::invalid_argument("attn_in: float32 q and k norm weights [D]");
      }
      inputs.push_back(*w);
    }
  }
  if (q_bias.has_value() != k_bias.has_value() || q_bias.has_value() != v_bias.has_value()) {
    throw std::invalid_argument("attn_in: q, k and v biases all or none");
  }
  if (q_bias) {
    const std::pair<const mx::array*, const mx::array*> biased[] = {
        {&*q_bias, &q_w}, {&*k_bias, &k_w}, {&*v_bias, &v_w}};
    for (const auto& [b, w] : biased) {
      if (b->dtype() != mx::float32 || b->ndim() != 1 || b->shape(0) != w->shape(0)) {
        throw std::invalid_argument("attn_in: float32 biases of the q, k and v output sizes");
      }
      inputs.push_back(*b);
    }
  }
  return mx::array::make_arrays(
      {{B, n_heads, 1, D}, {B, n_kv_heads, 1, D}, {B, n_kv_heads, 1, Dv}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<AttnIn>(s, bits, eps, dims, traditional, base, scale),
      std::move(inputs));
}

void AttnIn::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  float* ys[3];
  for (int i = 0; i < 3; ++i) {
    outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
    enc.set_output_array(outputs[i]);
    ys[i] = outputs[i].data<float>();
  }
  QWeight W[3];
  for (int i = 0; i < 3; ++i) {
    W[i] = weight_of(inputs[2 + 3 * i], inputs[3 + 3 * i], bits_);
  }
  const int B = outputs[0].shape(0), Hq = outputs[0].shape(1), Hk = outputs[1].shape(1);
  const int dims = dims_;
  const bool trad = traditional_;
  const float eps = eps_, base = base_, scale = scale_;
  enc.dispatch([=, arrs = weak_copies(inputs)]() mutable {
    std::vector<std::vector<char>> tmp;
    const auto p = row_major(arrs, tmp);
    for (int i = 0; i < 3; ++i) {
      W[i].w = static_cast<const uint8_t*>(p[2 + 3 * i]);
      W[i].scales = p[3 + 3 * i];
      W[i].biases = p[4 + 3 * i];
    }
    const float* x = static_cast<const float*>(p[0]);
    const float* nw = static_cast<const float*>(p[1]);
    const int32_t* off = static_cast<const int32_t*>(p[11]);
    // After the 12 fixed inputs: the q/k norm weights (2), the q/k/v biases (3), or both (5).
    const size_t extra = arrs.size() - 12;
    const bool norms = extra == 2 || extra == 5;
    const float* bias[3] = {};
    if (extra >= 3) {
      for (int i = 0; i < 3; ++i) {
        bias[i] = static_cast<const float*>(p[(norms ? 14 : 12) + i]);
      }
    }
    attn_in_rows(
        W, x, nw, eps, B, Hq, Hk, off, arrs[11].size() > 1,
        norms ? static_cast<const float*>(p[12]) : nullptr,
        norms ? static_cast<const float*>(p[13]) : nullptr, extra >= 3 ? bias : nullptr,
        {dims, trad, base, scale}, ys);
  });
}

void AttnIn::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("MlxdAttnIn runs on the CPU only");
}

} // namespace mlxd
