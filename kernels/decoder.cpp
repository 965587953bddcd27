#include "decoder.h"
#include "packed.h"
#include "parts.h"
#include "qmm.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

// Where the inputs sit: x, the 23 weight arrays, the cache's keys, values and offset, then the
// optional ones (mask, q/k norm weights, q/k/v biases) of those present.
constexpr int kW = 1, kKeys = 24, kValues = 25, kOffset = 26, kFixed = 27;
// The weight groups (weight, scales, biases) and the second norm by their index in `weights`.
constexpr int kQ = 1, kK = 4, kV = 7, kO = 10, kN2 = 13, kGate = 14, kUp = 17, kDown = 20;

void require(bool ok, const char* what) {
  if (!ok) {
    throw std::invalid_argument(std::string("decoder_layer: ") + what);
  }
}

bool vec_f32(const mx::array& a, int n) {
  return a.dtype() == mx::float32 && a.ndim() == 1 && a.shape(0) == n;
}

} // namespace

LayerPlan layer_plan(
    const std::vector<mx::array>& weights,
    const std::vector<int>& bits,
    float eps1,
    float eps2,
    int n_heads,
    int dims,
    bool traditional,
    float base,
    float rope_scale,
    float attn_scale,
    const std::optional<mx::array>& q_norm_w,
    const std::optional<mx::array>& k_norm_w,
    const std::optional<mx::array>& q_bias,
    const std::optional<mx::array>& k_bias,
    const std::optional<mx::array>& v_bias) {
  require(weights.size() == 23 && bits.size() == 4, "23 weight arrays and 4 bit widths");
  auto group = [&](const char* what, int i, int b) {
    return check_weight(what, weights[i], weights[i + 1], weights[i + 2], b);
  };
  const int K = group("decoder_layer (q)", kQ, bits[0]);
  require(
      group("decoder_layer (k)", kK, bits[0]) == K &&
          group("decoder_layer (v)", kV, bits[0]) == K,
      "q, k and v weights of one input size K");
  require(vec_f32(weights[0], K) && vec_f32(weights[kN2], K), "float32 norm weights [K]");
  require(n_heads >= 1 && weights[kQ].shape(0) % n_heads == 0, "q [Hq * D, K]");
  const int D = weights[kQ].shape(0) / n_heads;
  require(weights[kK].shape(0) % D == 0, "k [Hk * D, K]");
  const int Hk = weights[kK].shape(0) / D;
  require(Hk >= 1 && n_heads % Hk == 0 && n_heads / Hk <= 64 &&
              weights[kV].shape(0) % Hk == 0,
          "Hq a multiple of Hk (at most 64 times), v [Hk * Dv, K]");
  const int Dv = weights[kV].shape(0) / Hk;
  require(group("decoder_layer (o)", kO, bits[1]) == n_heads * Dv &&
              weights[kO].shape(0) == K,
          "o [K, Hq * Dv]");
  const int F = weights[kGate].shape(0);
  require(group("decoder_layer (gate)", kGate, bits[2]) == K &&
              group("decoder_layer (up)", kUp, bits[2]) == K &&
              weights[kUp].shape(0) == F &&
              group("decoder_layer (down)", kDown, bits[3]) == F &&
              weights[kDown].shape(0) == K,
          "gate and up [F, K], down [K, F]");
  require(dims % 2 == 0 && dims <= D, "even RoPE dims <= D");
  LayerPlan plan{weights, {},
                 DecoderParams{{bits[0], bits[1], bits[2], bits[3]}, eps1, eps2, dims,
                               traditional, base, rope_scale, attn_scale, 0, false,
                               q_norm_w.has_value(), q_bias.has_value()},
                 K, Hk, D, Dv};
  require(q_norm_w.has_value() == k_norm_w.has_value(), "q and k norm weights both or neither");
  if (q_norm_w) {
    require(vec_f32(*q_norm_w, D) && vec_f32(*k_norm_w, D), "float32 q and k norm weights [D]");
    plan.extras.insert(plan.extras.end(), {*q_norm_w, *k_norm_w});
  }
  require(q_bias.has_value() == k_bias.has_value() && q_bias.has_value() == v_bias.has_value(),
          "q, k and v biases all or none");
  if (q_bias) {
    require(vec_f32(*q_bias, n_heads * D) && vec_f32(*k_bias, Hk * D) && vec_f32(*v_bias, Hk * Dv),
            "float32 biases of the q, k and v output sizes");
    plan.extras.insert(plan.extras.end(), {*q_bias, *k_bias, *v_bias});
  }
  return plan;
}

std::vector<mx::array> decoder_layer(
    const LayerPlan& plan,
    const mx::array& x,
    const mx::array& keys,
    const mx::array& values,
    const mx::array& offset,
    int idx,
    const std::optional<mx::array>& mask) {
  const int K = plan.K, Hk = plan.Hk;
  require(x.dtype() == mx::float32 && x.ndim() == 3 && x.shape(1) == 1 && x.shape(2) == K,
          "float32 x [B, 1, K]");
  const int B = x.shape(0);
  require(keys.dtype() == mx::float32 && values.dtype() == mx::float32 && keys.ndim() == 4 &&
              values.ndim() == 4 && keys.shape(0) == B && values.shape(0) == B &&
              keys.shape(1) == Hk && values.shape(1) == Hk && keys.shape(3) == plan.D &&
              values.shape(3) == plan.Dv && values.shape(2) == keys.shape(2),
          "float32 keys [B, Hk, C, D] and values [B, Hk, C, Dv] of the layer's heads");
  require(offset.dtype() == mx::int32 && offset.ndim() == 1 && offset.shape(0) == B,
          "int32 offset [B]");
  require(idx >= 0 && idx < keys.shape(2), "the position written inside the buffers");
  std::vector<mx::array> inputs;
  inputs.reserve(kFixed + 1 + plan.extras.size());
  inputs.push_back(x);
  inputs.insert(inputs.end(), plan.weights.begin(), plan.weights.end());
  inputs.insert(inputs.end(), {keys, values, offset});
  if (mask) {
    const auto& m = *mask;
    require(m.dtype() == mx::bool_ && m.ndim() == 4 && (m.shape(0) == 1 || m.shape(0) == B) &&
                m.shape(1) == 1 && m.shape(2) == 1 && m.shape(3) == idx + 1,
            "mask bool [B or 1, 1, 1, idx + 1]");
    inputs.push_back(m);
  }
  inputs.insert(inputs.end(), plan.extras.begin(), plan.extras.end());
  DecoderParams p = plan.params;
  p.idx = idx;
  p.mask = mask.has_value();
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      {x.shape(), keys.shape(), values.shape(), offset.shape()},
      {mx::float32, mx::float32, mx::float32, mx::int32},
      std::make_shared<DecoderLayer>(s, p),
      std::move(inputs));
}

void DecoderLayer::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  // As kv_update: the other outputs' copies of the inputs go, so MLX may donate the buffers.
  for (auto& o : outputs) {
    if (&o.inputs() != &inputs) {
      o.inputs().clear();
    }
  }
  bool copy[2];
  for (int i = 0; i < 2; ++i) {
    const auto& in = inputs[kKeys + i];
    copy[i] = !(in.is_donatable() && in.flags().row_contiguous);
    if (copy[i]) {
      outputs[1 + i].set_data(mx::allocator::malloc(outputs[1 + i].nbytes()));
    } else {
      outputs[1 + i].copy_shared_buffer(in);
    }
  }
  for (int i : {0, 3}) {
    outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
  }
  for (auto& o : outputs) {
    enc.set_output_array(o);
  }
  const DecoderParams prm = p_;
  QWeight W[7];
  const int groups[7] = {kQ, kK, kV, kO, kGate, kUp, kDown};
  const int wbits[7] = {prm.bits[0], prm.bits[0], prm.bits[0], prm.bits[1],
                        prm.bits[2], prm.bits[2], prm.bits[3]};
  for (int i = 0; i < 7; ++i) {
    W[i] = weight_of(inputs[kW + groups[i]], inputs[kW + groups[i] + 1], wbits[i]);
  }
  float* y = outputs[0].data<float>();
  float* bufs[2] = {outputs[1].data<float>(), outputs[2].data<float>()};
  int32_t* off_out = outputs[3].data<int32_t>();
  enc.dispatch([=, arrs = weak_copies(inputs)]() mutable {
    std::vector<std::vector<char>> tmp;
    const auto p = row_major(arrs, tmp);
    for (int i = 0; i < 7; ++i) {
      const int at = kW + groups[i];
      W[i].w = static_cast<const uint8_t*>(p[at]);
      W[i].scales = p[at + 1];
      W[i].biases = p[at + 2];
    }
    const auto& kb = arrs[kKeys];
    const int B = arrs[0].shape(0), K = W[0].K, Hk = kb.shape(1), C = kb.shape(2);
    const int D = kb.shape(3), Dv = arrs[kValues].shape(3), Hq = W[0].N / D, idx = prm.idx;
    const float* x = static_cast<const float*>(p[0]);
    const int32_t* off = static_cast<const int32_t*>(p[kOffset]);
    size_t next = kFixed + (prm.mask ? 1 : 0);
    const float* qn = prm.norms ? static_cast<const float*>(p[next]) : nullptr;
    const float* kn = prm.norms ? static_cast<const float*>(p[next + 1]) : nullptr;
    next += prm.norms ? 2 : 0;
    const float* bias[3] = {};
    for (int i = 0; prm.bias && i < 3; ++i) {
      bias[i] = static_cast<const float*>(p[next + i]);
    }
    // attn_in: q [B, Hq, D], k [B, Hk, D], v [B, Hk, Dv].
    std::vector<float> q(static_cast<size_t>(B) * Hq * D), k(static_cast<size_t>(B) * Hk * D),
        v(static_cast<size_t>(B) * Hk * Dv);
    float* ys[3] = {q.data(), k.data(), v.data()};
    attn_in_rows(
        W, x, static_cast<const float*>(p[kW]), prm.eps1, B, Hq, Hk, off, B > 1, qn, kn,
        prm.bias ? bias : nullptr, {prm.dims, prm.traditional, prm.base, prm.rope_scale}, ys);
    // The cache's write: position idx of every (row, kv head).
    const int dk[2] = {D, Dv};
    for (int i = 0; i < 2; ++i) {
      if (copy[i]) {
        write_rows(arrs[kKeys + i], reinterpret_cast<char*>(bufs[i]), C, 0);
      }
      for (int r = 0; r < B * Hk; ++r) {
        std::memcpy(bufs[i] + (static_cast<size_t>(r) * C + idx) * dk[i],
                    ys[1 + i] + static_cast<size_t>(r) * dk[i], sizeof(float) * dk[i]);
      }
    }
    for (int b = 0; b < B; ++b) {
      off_out[b] = off[b] + 1;
    }
    // Attention over the buffers' first idx + 1 positions, as decode_attention reads the views.
    std::vector<float> attn(static_cast<size_t>(B) * Hq * Dv);
    const int64_t cs = C;
    Job j{{q.data(), static_cast<int64_t>(Hq) * D, D, D},
          {bufs[0], Hk * cs * D, cs * D, D},
          {bufs[1], Hk * cs * Dv, cs * Dv, Dv},
          nullptr, 0, 0, 0, attn.data(), B, Hq, Hk, 1, idx + 1, D, Dv, prm.attn_scale, false};
    if (prm.mask) {
      const auto& m = arrs[kFixed];
      j.mask = m.data<bool>();
      j.msb = m.shape(0) == 1 ? 0 : m.strides()[0];
      j.msl = 0;
      j.mst = m.strides()[3];
    }
    attention_rows(j);
    // h = x + o_proj(attn), then y = h + mlp(rms_norm(h)): qmm_add's and mlp_residual's sums.
    std::vector<float> h(static_cast<size_t>(B) * K);
    qmm_rows(W[3], attn.data(), B, h.data());
    for (size_t i = 0; i < h.size(); ++i) {
      h[i] = x[i] + h[i];
    }
    mlp_residual_rows(
        W[4], W[5], W[6], false, h.data(), static_cast<const float*>(p[kW + kN2]), nullptr,
        prm.eps2, B, y);
  });
}

void DecoderLayer::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("MlxdDecoderLayer runs on the CPU only");
}

} // namespace mlxd
