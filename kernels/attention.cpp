// Decode attention: per (row, kv head), the keys the mask lets through are gathered in cache
// order, scored for the head's R query heads at once (each key row is loaded once for the GQA
// group), and folded into an online softmax block by block (running max, rescaled sums), with the
// vectorized exp of vexp.h. Blocks count attended keys only, so a row's sums run in the same
// order whatever padding the batch gives it: a row gets the same bits alone or in a batch.
#include "attention.h"
#include "packed.h"
#include "pool.h"
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

// ---- small vector helpers (AVX-512, AVX2 or scalar) ------------------------------------------
inline float dot(const float* a, const float* b, int n) {
  int i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// y = y * a + p * x (a == 1: the plain accumulation).
inline void scale_axpy(float* y, float a, float p, const float* x, int n) {
  int i = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a), vp = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) {
    __m512 yv = _mm512_loadu_ps(y + i);
    if (a != 1.f) {
      yv = _mm512_mul_ps(yv, va);
    }
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(vp, _mm512_loadu_ps(x + i), yv));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(a), vp = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) {
    __m256 yv = _mm256_loadu_ps(y + i);
    if (a != 1.f) {
      yv = _mm256_mul_ps(yv, va);
    }
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(x + i), yv));
  }
#endif
  for (; i < n; ++i) {
    y[i] = (a != 1.f ? y[i] * a : y[i]) + p * x[i];
  }
}

// ---- the kernel ------------------------------------------------------------------------------
struct View { // a float32 [B, H, T, D] array with unit last stride
  const float* p;
  int64_t sb, sh, st;
  const float* at(int b, int h, int t) const {
    return p + b * sb + h * sh + t * st;
  }
};

struct Job {
  View q, k, v;
  const bool* mask; // [Bm, T] with strides (msb, mst); null: every key
  int64_t msb, mst;
  float* out; // [B, Hq, 1, Dv] contiguous
  int B, Hq, Hk, T, D, Dv;
  float scale;
};

// One (row, kv head): its R query heads against the attended keys.
void attend(const Job& j, int b, int g) {
  const int R = j.Hq / j.Hk, D = j.D, Dv = j.Dv;
  thread_local std::vector<int> keys;
  thread_local std::vector<float> qs, sc, acc;
  keys.clear();
  for (int t = 0; t < j.T; ++t) {
    if (j.mask == nullptr || j.mask[b * j.msb + t * j.mst]) {
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
    const float* qr = j.q.at(b, g * R + r, 0);
    for (int d = 0; d < D; ++d) {
      qs[r * D + d] = qr[d] * j.scale; // scaled first, as MLX's SDPA does
    }
  }
  float m[64], l[64]; // per query head of the group: running max and sum
  std::fill(m, m + R, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R, 0.f);
  for (int j0 = 0; j0 < n; j0 += kBlock) {
    const int nb = std::min(kBlock, n - j0);
    for (int jj = 0; jj < nb; ++jj) {
      const float* kt = j.k.at(b, g, keys[j0 + jj]);
      for (int r = 0; r < R; ++r) {
        sc[r * kBlock + jj] = uniform ? 0.f : dot(qs.data() + r * D, kt, D);
      }
    }
    float alpha[64];
    for (int r = 0; r < R; ++r) {
      float* s = sc.data() + r * kBlock;
      const float bm = *std::max_element(s, s + nb);
      const float mn = std::max(m[r], bm);
      alpha[r] = j0 == 0 ? 1.f : vexp::exp1(m[r] - mn);
      m[r] = mn;
      l[r] = l[r] * alpha[r] + vexp::exp_shifted_sum(s, nb, mn);
    }
    for (int jj = 0; jj < nb; ++jj) {
      const float* vt = j.v.at(b, g, keys[j0 + jj]);
      for (int r = 0; r < R; ++r) {
        // The block's rescale of the earlier sums rides on its first key.
        scale_axpy(acc.data() + r * Dv, jj == 0 ? alpha[r] : 1.f, sc[r * kBlock + jj], vt, Dv);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = j.out + (static_cast<size_t>(b) * j.Hq + g * R + r) * Dv;
    const float inv = 1.f / l[r];
    for (int d = 0; d < Dv; ++d) {
      o[d] = acc[r * Dv + d] * inv;
    }
  }
}

void run(const Job& j) {
  // Below ~64k multiply-adds a second thread costs more than it saves.
  const double work = static_cast<double>(j.B) * j.Hq * j.T * (j.D + j.Dv);
  pool().run(j.B * j.Hk, work >= 65536.0, [&](int c) { attend(j, c / j.Hk, c % j.Hk); });
}

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
    float scale) {
  for (const auto* a : {&q, &k, &v}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4) {
      throw std::invalid_argument("decode_attention: float32 q, k, v of 4 dims");
    }
  }
  const int B = q.shape(0), Hq = q.shape(1), Hk = k.shape(1), T = k.shape(2);
  if (q.shape(2) != 1 || k.shape(0) != B || v.shape(0) != B || v.shape(1) != Hk ||
      v.shape(2) != T || k.shape(3) != q.shape(3) || Hk < 1 || Hq % Hk || Hq / Hk > 64) {
    throw std::invalid_argument(
        "decode_attention: q [B, Hq, 1, D], k [B, Hk, T, D], v [B, Hk, T, Dv], Hq = R * Hk");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{q, k, v};
  if (mask.has_value()) {
    const auto& m = *mask;
    if (m.dtype() != mx::bool_ || m.ndim() != 4 || (m.shape(0) != 1 && m.shape(0) != B) ||
        m.shape(1) != 1 || m.shape(2) != 1 || m.shape(3) != T) {
      throw std::invalid_argument("decode_attention: mask bool [B or 1, 1, 1, T]");
    }
    inputs.push_back(m);
  }
  return mx::array(
      {B, Hq, 1, v.shape(3)},
      mx::float32,
      std::make_shared<DecodeAttention>(s, scale),
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
  enc.dispatch([arrs = std::move(arrs), o = out.data<float>(), scale]() {
    const auto &q = arrs[0], &k = arrs[1], &v = arrs[2];
    std::vector<char> tq, tk, tv;
    Job j{view_of(q, tq), view_of(k, tk), view_of(v, tv), nullptr, 0, 0, o,
          q.shape(0), q.shape(1), k.shape(1), k.shape(2), k.shape(3), v.shape(3), scale};
    if (arrs.size() == 4) {
      const auto& m = arrs[3];
      j.mask = m.data<bool>();
      j.msb = m.shape(0) == 1 ? 0 : m.strides()[0];
      j.mst = m.strides()[3];
    }
    run(j);
  });
}

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdDecodeAttention runs on the CPU only");
}

} // namespace mlxd
