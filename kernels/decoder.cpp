#include "decoder.h"
#include "kv_cache.h"
#include "packed.h"
#include "qmm.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

namespace mlxd {

namespace {

// The weight groups (weight, scales, biases) and the second norm by their index in `weights`.
constexpr int kQ = 1, kK = 4, kV = 7, kO = 10, kN2 = 13, kGate = 14, kUp = 17, kDown = 20;
// The stack's inputs: x, offset, the mask when given, then each layer's keys and values.
constexpr int kX = 0, kOffset = 1;

void require(bool ok, const char* what) {
  if (!ok) {
    throw std::invalid_argument(std::string("decoder_layer: ") + what);
  }
}

bool vec_f32(const mx::array& a, int n) {
  return a.dtype() == mx::float32 && a.ndim() == 1 && a.shape(0) == n;
}

// One layer of one step from x into y ([B, T, K] each: T query positions a row, a decode step's
// one or a verify pass's drafts), its cache's buffers (C positions) taking the new keys and values
// at idx .. idx + T - 1: attn_in, the write, attention, o_proj and the MLP over the B * T rows,
// with the unfused ops' sums (parts.h). Each row's sums do not depend on the other rows, so a
// position gives the bits a one-position step there gives.
void run_layer(
    const LayerPlan& L, const float* x, float* y, float* const* bufs, int B, int T, int C, int idx,
    const int32_t* pos, const Job& masked) {
  const int K = L.K, Hq = L.Hq, Hk = L.Hk, D = L.D, Dv = L.Dv, M = B * T;
  std::vector<float> q(static_cast<size_t>(M) * Hq * D), k(static_cast<size_t>(M) * Hk * D),
      v(static_cast<size_t>(M) * Hk * Dv);
  float* ys[3] = {q.data(), k.data(), v.data()};
  attn_in_rows(
      L.W, x, L.n1, L.eps1, M, Hq, Hk, pos, M > 1, L.qn, L.kn, L.bias[0] ? L.bias : nullptr,
      L.rope, ys);
  const int dk[2] = {D, Dv};
  for (int i = 0; i < 2; ++i) { // [B, T, Hk, d] into [B, Hk, C, d] at idx + t
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t < T; ++t) {
        for (int g = 0; g < Hk; ++g) {
          std::memcpy(bufs[i] + ((static_cast<size_t>(b) * Hk + g) * C + idx + t) * dk[i],
                      ys[1 + i] + ((static_cast<size_t>(b) * T + t) * Hk + g) * dk[i],
                      sizeof(float) * dk[i]);
        }
      }
    }
  }
  // Attention over the buffers' first idx + T positions, as decode_attention reads the views.
  std::vector<float> attn(static_cast<size_t>(M) * Hq * Dv);
  const int64_t cs = C;
  Job j = masked;
  j.q = {q.data(), static_cast<int64_t>(T) * Hq * D, D, static_cast<int64_t>(Hq) * D};
  j.k = {bufs[0], Hk * cs * D, cs * D, D};
  j.v = {bufs[1], Hk * cs * Dv, cs * Dv, Dv};
  j.out = attn.data();
  j.B = B, j.Hq = Hq, j.Hk = Hk, j.L = T, j.T = idx + T, j.D = D, j.Dv = Dv;
  j.scale = L.attn_scale, j.causal = false;
  attention_rows(j);
  if (T > 1) { // [B, Hq, T, Dv] as [B, T, Hq * Dv], the rows o_proj reads
    std::vector<float> rows(attn.size());
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < Hq; ++h) {
        for (int t = 0; t < T; ++t) {
          std::memcpy(rows.data() + ((static_cast<size_t>(b) * T + t) * Hq + h) * Dv,
                      attn.data() + ((static_cast<size_t>(b) * Hq + h) * T + t) * Dv,
                      sizeof(float) * Dv);
        }
      }
    }
    attn.swap(rows);
  }
  // h = x + o_proj(attn), then y = h + mlp(rms_norm(h)): qmm_add's and mlp_residual's sums.
  std::vector<float> h(static_cast<size_t>(M) * K);
  qmm_rows(L.W[3], attn.data(), M, h.data());
  for (size_t i = 0; i < h.size(); ++i) {
    h[i] = x[i] + h[i];
  }
  mlp_residual_rows(L.W[4], L.W[5], L.W[6], false, h.data(), L.n2, nullptr, L.eps2, M, y);
}

} // namespace

std::shared_ptr<LayerPlan> layer_plan(
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
  require(group("decoder_layer (k)", kK, bits[0]) == K && group("decoder_layer (v)", kV, bits[0]) == K,
          "q, k and v weights of one input size K");
  require(vec_f32(weights[0], K) && vec_f32(weights[kN2], K), "float32 norm weights [K]");
  require(n_heads >= 1 && weights[kQ].shape(0) % n_heads == 0, "q [Hq * D, K]");
  const int D = weights[kQ].shape(0) / n_heads;
  require(weights[kK].shape(0) % D == 0, "k [Hk * D, K]");
  const int Hk = weights[kK].shape(0) / D;
  require(Hk >= 1 && n_heads % Hk == 0 && n_heads / Hk <= 64 && weights[kV].shape(0) % Hk == 0,
          "Hq a multiple of Hk (at most 64 times), v [Hk * Dv, K]");
  const int Dv = weights[kV].shape(0) / Hk;
  require(group("decoder_layer (o)", kO, bits[1]) == n_heads * Dv && weights[kO].shape(0) == K,
          "o [K, Hq * Dv]");
  const int F = weights[kGate].shape(0);
  require(group("decoder_layer (gate)", kGate, bits[2]) == K &&
              group("decoder_layer (up)", kUp, bits[2]) == K && weights[kUp].shape(0) == F &&
              group("decoder_layer (down)", kDown, bits[3]) == F && weights[kDown].shape(0) == K,
          "gate and up [F, K], down [K, F]");
  require(dims % 2 == 0 && dims <= D, "even RoPE dims <= D");
  require(q_norm_w.has_value() == k_norm_w.has_value(), "q and k norm weights both or neither");
  require(q_bias.has_value() == k_bias.has_value() && q_bias.has_value() == v_bias.has_value(),
          "q, k and v biases all or none");
  auto plan = std::make_shared<LayerPlan>();
  auto& P = *plan;
  auto s = mx::default_stream(mx::Device::cpu);
  for (const auto& w : weights) {
    P.arrays.push_back(w.flags().row_contiguous ? w : mx::contiguous(w, false, s));
  }
  if (q_norm_w) {
    require(vec_f32(*q_norm_w, D) && vec_f32(*k_norm_w, D), "float32 q and k norm weights [D]");
    P.arrays.insert(P.arrays.end(), {*q_norm_w, *k_norm_w});
  }
  if (q_bias) {
    require(vec_f32(*q_bias, n_heads * D) && vec_f32(*k_bias, Hk * D) && vec_f32(*v_bias, Hk * Dv),
            "float32 biases of the q, k and v output sizes");
    P.arrays.insert(P.arrays.end(), {*q_bias, *k_bias, *v_bias});
  }
  mx::eval(P.arrays);
  for (auto& a : P.arrays) { // contiguous() may hand back a strided array as it is
    if (!a.flags().row_contiguous) {
      a = mx::copy(a, s);
      mx::eval(a);
    }
  }
  const int groups[7] = {kQ, kK, kV, kO, kGate, kUp, kDown};
  const int wbits[7] = {bits[0], bits[0], bits[0], bits[1], bits[2], bits[2], bits[3]};
  for (int i = 0; i < 7; ++i) {
    const auto& w = P.arrays[groups[i]];
    P.W[i] = weight_of(w, P.arrays[groups[i] + 1], wbits[i]);
    P.W[i].w = w.data<uint8_t>();
    P.W[i].scales = P.arrays[groups[i] + 1].data<void>();
    P.W[i].biases = P.arrays[groups[i] + 2].data<void>();
  }
  P.n1 = P.arrays[0].data<float>();
  P.n2 = P.arrays[kN2].data<float>();
  const size_t extra = 23 + (q_norm_w ? 2 : 0);
  P.qn = q_norm_w ? P.arrays[23].data<float>() : nullptr;
  P.kn = q_norm_w ? P.arrays[24].data<float>() : nullptr;
  for (int i = 0; i < 3; ++i) {
    P.bias[i] = q_bias ? P.arrays[extra + i].data<float>() : nullptr;
  }
  P.eps1 = eps1, P.eps2 = eps2, P.attn_scale = attn_scale;
  P.rope = {dims, traditional, base, rope_scale};
  P.K = K, P.Hq = n_heads, P.Hk = Hk, P.D = D, P.Dv = Dv;
  return plan;
}

std::vector<mx::array> decoder_stack(
    const std::vector<std::shared_ptr<LayerPlan>>& plans,
    const mx::array& x,
    const std::vector<mx::array>& keys,
    const std::vector<mx::array>& values,
    const mx::array& offset,
    int idx,
    const std::optional<mx::array>& mask) {
  const size_t n = plans.size();
  require(n >= 1 && keys.size() == n && values.size() == n, "a cache's keys and values a layer");
  const int K = plans[0]->K;
  require(x.dtype() == mx::float32 && x.ndim() == 3 && x.shape(1) >= 1 && x.shape(2) == K,
          "float32 x [B, T, K]");
  const int B = x.shape(0), T = x.shape(1), C = keys[0].ndim() == 4 ? keys[0].shape(2) : 0;
  require(offset.dtype() == mx::int32 && offset.ndim() == 1 && offset.shape(0) == B,
          "int32 offset [B]");
  require(idx >= 0 && idx + T <= C, "the positions written inside the buffers");
  std::vector<mx::Shape> shapes = {x.shape(), offset.shape()};
  std::vector<mx::Dtype> dtypes = {mx::float32, mx::int32};
  std::vector<mx::array> inputs = {x, offset};
  if (mask) {
    const auto& m = *mask;
    require(m.dtype() == mx::bool_ && m.ndim() == 4 && (m.shape(0) == 1 || m.shape(0) == B) &&
                m.shape(1) == 1 && m.shape(2) == T && m.shape(3) == idx + T,
            "mask bool [B or 1, 1, T, idx + T]");
    inputs.push_back(m);
  }
  for (size_t i = 0; i < n; ++i) {
    const auto& P = *plans[i];
    const auto &kb = keys[i], &vb = values[i];
    require(P.K == K && kb.dtype() == mx::float32 && vb.dtype() == mx::float32 &&
                kb.shape() == mx::Shape({B, P.Hk, C, P.D}) &&
                vb.shape() == mx::Shape({B, P.Hk, C, P.Dv}),
            "float32 keys [B, Hk, C, D] and values [B, Hk, C, Dv] of each layer's heads");
    inputs.insert(inputs.end(), {kb, vb});
    shapes.insert(shapes.end(), {kb.shape(), vb.shape()});
    dtypes.insert(dtypes.end(), {mx::float32, mx::float32});
  }
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      std::move(shapes), dtypes, std::make_shared<DecoderStack>(s, plans, idx, mask.has_value()),
      std::move(inputs));
}

void DecoderStack::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  encode_donatable_inputs(stream(), inputs, outputs); // the KV buffers may then be donated
  auto& enc = mx::cpu::get_command_encoder(stream());
  const size_t first = mask_ ? 3 : 2; // the first layer's keys
  std::vector<char> copy(outputs.size() - 2);
  for (size_t i = 0; i < copy.size(); ++i) {
    const auto& in = inputs[first + i];
    copy[i] = !(in.is_donatable() && in.flags().row_contiguous);
    if (copy[i]) {
      outputs[2 + i].set_data(mx::allocator::malloc(outputs[2 + i].nbytes()));
    } else {
      outputs[2 + i].copy_shared_buffer(in);
    }
  }
  for (int i : {0, 1}) {
    outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
  }
  std::vector<float*> bufs;
  for (size_t i = 2; i < outputs.size(); ++i) {
    bufs.push_back(outputs[i].data<float>());
  }
  for (auto& o : outputs) {
    enc.set_output_array(o);
  }
  enc.dispatch([plans = plans_, idx = idx_, mask = mask_, first, copy, bufs,
                y = outputs[0].data<float>(), off_out = outputs[1].data<int32_t>(),
                arrs = weak_copies(inputs)]() {
    const auto& x0 = arrs[kX];
    const int B = x0.shape(0), T = x0.shape(1), K = plans[0]->K, C = arrs[first].shape(2);
    std::vector<char> xt, ot;
    const float* x = x0.flags().row_contiguous ? x0.data<float>()
                                                : reinterpret_cast<const float*>((xt = packed_copy(x0)).data());
    const auto& o = arrs[kOffset];
    const int32_t* off = o.flags().row_contiguous
        ? o.data<int32_t>()
        : reinterpret_cast<const int32_t*>((ot = packed_copy(o)).data());
    Job masked{};
    if (mask) {
      const auto& m = arrs[2];
      masked.mask = m.data<bool>();
      masked.msb = m.shape(0) == 1 ? 0 : m.strides()[0];
      masked.msl = T == 1 ? 0 : m.strides()[2];
      masked.mst = m.strides()[3];
    }
    for (size_t i = 0; i < copy.size(); ++i) {
      if (copy[i]) {
        write_rows(arrs[first + i], reinterpret_cast<char*>(bufs[i]), C, 0);
      }
    }
    // Position t of row b at off[b] + t (rows of a left-padded batch start apart).
    std::vector<int32_t> pos(static_cast<size_t>(B) * T);
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t < T; ++t) {
        pos[static_cast<size_t>(b) * T + t] = off[b] + t;
      }
    }
    // Layer by layer through two scratch rows; the last writes y.
    std::vector<float> h[2] = {std::vector<float>(static_cast<size_t>(B) * T * K),
                               std::vector<float>(static_cast<size_t>(B) * T * K)};
    const float* in = x;
    for (size_t l = 0; l < plans.size(); ++l) {
      float* out = l + 1 == plans.size() ? y : h[l % 2].data();
      float* kv[2] = {bufs[2 * l], bufs[2 * l + 1]};
      run_layer(*plans[l], in, out, kv, B, T, C, idx, pos.data(), masked);
      in = out;
    }
    for (int b = 0; b < B; ++b) {
      off_out[b] = off[b] + T;
    }
  });
}

void DecoderStack::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("MlxdDecoderStack runs on the CPU only");
}

} // namespace mlxd
