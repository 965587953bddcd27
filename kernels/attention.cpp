// Attention: per (row, kv head, query position), the keys the mask (and for a causal prefill
// chunk, the position) lets through are gathered in cache order, scored for the head's R query
// heads (each key row loaded once for up to 4 heads of the GQA group), and folded into an online
// softmax block by block (running max, rescaled sums), with the vectorized exp of vexp.h. Blocks
// count attended keys only, so a row's sums run in the same order whatever padding the batch
// gives it: a row gets the same bits alone or in a batch, and a position verified among a few
// (speculative drafts, each with its causal mask row) the same bits as when it is decoded alone.
#include "attention.h"
#include "attention_job.h"
#include "attention_prefill.h"
#include "packed.h"
#include "parts.h"
#include "pool.h"
#include "simd.h"
#include "vexp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

constexpr int kBlock = 128; // attended keys per online-softmax block


inline float dot(const float* a, const float* b, int n) {
  int i = 0;
  float s = 0.f;
#if defined(MLXD_SIMD)
  vec acc = vzero();
  for (; i + kLanes <= n; i += kLanes) {
    acc = vfma(vload(a + i), vload(b + i), acc);
  }
  s = vsum(acc);
#endif
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// y = y * a + p * x (a == 1: the plain accumulation).
inline void scale_axpy(float* y, float a, float p, const float* x, int n) {
  int i = 0;
#if defined(MLXD_SIMD)
  const vec va = vset(a), vp = vset(p);
  for (; i + kLanes <= n; i += kLanes) {
    vec yv = vload(y + i);
    if (a != 1.f) {
      yv = vmul(yv, va);
    }
    vstore(y + i, vfma(vp, vload(x + i), yv));
  }
#endif
  for (; i < n; ++i) {
    y[i] = (a != 1.f ? y[i] * a : y[i]) + p * x[i];
  }
}

// ---- the kernel ------------------------------------------------------------------------------
// Scores of one query head (q, scaled) against a block of keys, for any head size.
void block_scores(const Job& j, int b, int g, const int* keys, int nb, const float* q, float* s) {
  for (int jj = 0; jj < nb; ++jj) {
    s[jj] = dot(q, j.k.at(b, g, keys[jj]), j.D);
  }
}

// Scores of R query heads (qs [R, D], scaled) against a block of keys, into s [R, kBlock]. ND:
// vectors per head row; each key row is loaded once for up to 4 heads of its group (the key
// streamed from L2 once, not once a head), each head's sum in one order.
template <int ND>
void group_scores(
    const Job& j, int b, int g, const int* keys, int nb, const float* qs, int R, float* s) {
#if defined(MLXD_SIMD)
  for (int r0 = 0; r0 < R; r0 += 4) {
    const int rn = std::min(4, R - r0);
    for (int jj = 0; jj < nb; ++jj) {
      const float* kt = j.k.at(b, g, keys[jj]);
      vec kv[ND];
      for (int i = 0; i < ND; ++i) {
        kv[i] = vload(kt + i * kLanes);
      }
      for (int r = 0; r < rn; ++r) {
        const float* q = qs + (r0 + r) * j.D;
        vec a = vzero();
        for (int i = 0; i < ND; ++i) {
          a = vfma(vload(q + i * kLanes), kv[i], a);
        }
        s[(r0 + r) * kBlock + jj] = vsum(a);
      }
    }
  }
#endif
}

// acc = acc * alpha + sum_jj p[jj] * v[keys[jj]] for one query head (same operations either way).
template <int ND>
void block_accumulate(
    const Job& j, int b, int g, const int* keys, int nb, const float* p, float alpha, float* acc) {
  if constexpr (ND == 0) {
    for (int jj = 0; jj < nb; ++jj) {
      scale_axpy(acc, jj == 0 ? alpha : 1.f, p[jj], j.v.at(b, g, keys[jj]), j.Dv);
    }
  } else {
#if defined(MLXD_SIMD)
    vec a[ND];
    for (int i = 0; i < ND; ++i) {
      a[i] = vload(acc + i * kLanes);
      if (alpha != 1.f) {
        a[i] = vmul(a[i], vset(alpha));
      }
    }
    for (int jj = 0; jj < nb; ++jj) {
      const float* vt = j.v.at(b, g, keys[jj]);
      const vec pv = vset(p[jj]);
      for (int i = 0; i < ND; ++i) {
        a[i] = vfma(pv, vload(vt + i * kLanes), a[i]);
      }
    }
    for (int i = 0; i < ND; ++i) {
      vstore(acc + i * kLanes, a[i]);
    }
#endif
  }
}

// One (row, kv head, query position): its R query heads against the attended keys.
template <int ND>
void attend(const Job& j, int b, int g, int pos) {
  const int R = j.Hq / j.Hk, D = j.D, Dv = j.Dv;
  thread_local std::vector<int> keys;
  thread_local std::vector<float> qs, sc, acc;
  keys.clear();
  const bool* mrow = j.mask == nullptr ? nullptr : j.mask + b * j.msb + pos * j.msl;
  const int last = j.causal ? std::min(j.T, j.T - j.L + pos + 1) : j.T;
  for (int t = 0; t < last; ++t) {
    if (mrow == nullptr || mrow[t * j.mst]) {
      keys.push_back(t);
    }
  }
  // Nothing attended: MLX's softmax over all-masked scores is uniform over every key.
  const bool uniform = keys.empty();
  if (uniform) {
    for (int t = 0; t < j.T; ++t) {
      keys.push_back(t);
    }
  }
  const int n = static_cast<int>(keys.size());
  qs.resize(static_cast<size_t>(R) * D);
  sc.resize(static_cast<size_t>(R) * kBlock);
  acc.assign(static_cast<size_t>(R) * Dv, 0.f);
  for (int r = 0; r < R; ++r) {
    const float* qr = j.q.at(b, g * R + r, pos);
    for (int d = 0; d < D; ++d) {
      qs[r * D + d] = qr[d] * j.scale; // scaled first, as MLX's SDPA does
    }
  }
  float m[64], l[64]; // per query head of the group: running max and sum
  std::fill(m, m + R, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R, 0.f);
  for (int j0 = 0; j0 < n; j0 += kBlock) {
    const int nb = std::min(kBlock, n - j0);
    const int* kb = keys.data() + j0;
    if constexpr (ND > 0) {
      if (!uniform) {
        group_scores<ND>(j, b, g, kb, nb, qs.data(), R, sc.data());
      }
    }
    for (int r = 0; r < R; ++r) {
      float* s = sc.data() + r * kBlock;
      if (uniform) {
        std::fill(s, s + nb, 0.f);
      } else if constexpr (ND == 0) {
        block_scores(j, b, g, kb, nb, qs.data() + r * D, s);
      }
      const float mn = std::max(m[r], *std::max_element(s, s + nb));
      const float alpha = j0 == 0 ? 1.f : vexp::exp1(m[r] - mn);
      m[r] = mn;
      l[r] = l[r] * alpha + vexp::exp_shifted_sum(s, nb, mn);
      block_accumulate<ND>(j, b, g, kb, nb, s, alpha, acc.data() + r * Dv);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = j.out + ((static_cast<size_t>(b) * j.Hq + g * R + r) * j.L + pos) * Dv;
    const float inv = 1.f / l[r];
    for (int d = 0; d < Dv; ++d) {
      o[d] = acc[r * Dv + d] * inv;
    }
  }
}

using AttendFn = void (*)(const Job&, int, int, int);

// Head sizes of 1, 2, 4, 8 (and 16 with 32 vector registers: AVX-512, NEON) vectors keep a head
// row in registers.
AttendFn pick(int D, int Dv) {
#if defined(MLXD_SIMD)
  if (D == Dv && D % kLanes == 0) {
    switch (D / kLanes) {
      case 1:
        return attend<1>;
      case 2:
        return attend<2>;
      case 4:
        return attend<4>;
      case 8:
        return attend<8>;
      case 16:
        return kRegs == 32 ? attend<16> : attend<0>;
      default:
        break;
    }
  }
#endif
  return attend<0>;
}

} // namespace

void attention_rows(const Job& j) {
  if (prefill_attention(j)) {
    return;
  }
  // Below ~64k multiply-adds a second thread costs more than it saves.
  const double work = static_cast<double>(j.B) * j.Hq * j.L * j.T * (j.D + j.Dv);
  const AttendFn f = pick(j.D, j.Dv);
  // A chunk is a run of query positions of one (row, kv head): one position each up to 4096
  // units, more for a long prefill (the pool takes at most 65535 chunks a call).
  const int64_t units = static_cast<int64_t>(j.B) * j.Hk * j.L;
  const int span = static_cast<int>(std::max<int64_t>(1, (units + 4095) / 4096));
  const int per_head = (j.L + span - 1) / span, per_row = j.Hk * per_head;
  pool().run(j.B * per_row, work >= 65536.0, [&](int c) {
    const int b = c / per_row, g = (c % per_row) / per_head, p0 = (c % per_head) * span;
    for (int pos = p0; pos < std::min(j.L, p0 + span); ++pos) {
      f(j, b, g, pos);
    }
  });
}

namespace {

View view_of(const mx::array& a, std::vector<char>& tmp) {
  if (a.strides()[3] == 1 || a.shape(3) == 1) {
    return {a.data<float>(), a.strides()[0], a.strides()[1], a.strides()[2]};
  }
  tmp = packed_copy(a);
  const int64_t H = a.shape(1), T = a.shape(2), D = a.shape(3);
  return {reinterpret_cast<const float*>(tmp.data()), H * T * D, T * D, D};
}

} // namespace

mx::array decode_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const std::optional<mx::array>& mask,
    float scale,
    bool causal,
    bool flat) {
  for (const auto* a : {&q, &k, &v}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4) {
      throw std::invalid_argument("decode_attention: float32 q, k, v of 4 dims");
    }
  }
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), Hk = k.shape(1), T = k.shape(2);
  if (L < 1 || k.shape(0) != B || v.shape(0) != B || v.shape(1) != Hk ||
      v.shape(2) != T || k.shape(3) != q.shape(3) || Hk < 1 || Hq % Hk || Hq / Hk > 64) {
    throw std::invalid_argument(
        "decode_attention: q [B, Hq, L, D], k [B, Hk, T, D], v [B, Hk, T, Dv], Hq = R * Hk");
  }
  if (causal && T < L) {
    throw std::invalid_argument("decode_attention: a causal mask needs T >= L keys");
  }
  if (flat && L != 1) {
    throw std::invalid_argument("decode_attention: a flat output is for one query position");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{q, k, v};
  if (mask.has_value()) {
    const auto& m = *mask;
    if (m.dtype() != mx::bool_ || m.ndim() != 4 || (m.shape(0) != 1 && m.shape(0) != B) ||
        m.shape(1) != 1 || (m.shape(2) != 1 && m.shape(2) != L) || m.shape(3) != T) {
      throw std::invalid_argument("decode_attention: mask bool [B or 1, 1, L or 1, T]");
    }
    inputs.push_back(m);
  }
  // [B, Hq, 1, Dv] and [B, 1, Hq * Dv] are one layout: the kernel writes either.
  auto shape = flat ? mx::Shape{B, 1, Hq * v.shape(3)} : mx::Shape{B, Hq, L, v.shape(3)};
  return mx::array(
      std::move(shape),
      mx::float32,
      std::make_shared<DecodeAttention>(s, scale, causal),
      std::move(inputs));
}

void DecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  std::vector<mx::array> arrs;
  for (const auto& a : inputs) {
    arrs.push_back(mx::array::unsafe_weak_copy(a));
  }
  const float scale = scale_;
  const bool causal = causal_;
  enc.dispatch([arrs = std::move(arrs), o = out.data<float>(), scale, causal]() {
    const auto &q = arrs[0], &k = arrs[1], &v = arrs[2];
    std::vector<char> tq, tk, tv;
    Job j{view_of(q, tq), view_of(k, tk), view_of(v, tv), nullptr, 0, 0, 0, o,
          q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), k.shape(3), v.shape(3),
          scale, causal};
    if (arrs.size() == 4) {
      const auto& m = arrs[3];
      j.mask = m.data<bool>();
      j.msb = m.shape(0) == 1 ? 0 : m.strides()[0];
      j.msl = m.shape(2) == 1 ? 0 : m.strides()[2];
      j.mst = m.strides()[3];
    }
    attention_rows(j);
  });
}

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdDecodeAttention runs on the CPU only");
}

} // namespace mlxd
