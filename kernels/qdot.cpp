// Block-quantized dot products on the CPU: weights stay 4 or 8 bits in memory (the bandwidth a
// decode step is bound by) and are dequantized block by block in registers.
#include "qdot.h"
#include "qdot_i8.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

#include "mlx/types/half_types.h"

namespace mlxd {

namespace {

// ---- scales and biases to float ------------------------------------------------------------
void to_float(const void* src, SType t, float* dst, int n) {
  if (t == SType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int i = 0;
  if (t == SType::BF16) {
    for (; i < n; ++i) {
      uint32_t u = static_cast<uint32_t>(s[i]) << 16;
      std::memcpy(dst + i, &u, 4);
    }
    return;
  }
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) {
    dst[i] = _cvtsh_ss(s[i]);
  }
#else
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(*reinterpret_cast<const mlx::core::float16_t*>(s + i));
  }
#endif
}

// ---- SIMD (simd.h), and what only these kernels use ---------------------------------------
#if defined(MLXD_AVX512)
constexpr int kTile = 8; // rows of x per tile: 2 * 8 accumulators + 4 weight vectors fit 32 zmm
inline vec vround(vec v) {
  return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vec vpow2(vec p, vec n) { // p * 2^n for integral n
  return _mm512_scalef_ps(p, n);
}
inline vec bytes_to_vec(__m128i b) { // 16 unsigned bytes -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#elif defined(MLXD_X86)
constexpr int kTile = 4;
inline vec vround(vec v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vec vpow2(vec p, vec n) {
  __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
inline vec bytes_to_vec(__m128i b) { // the low 8 unsigned bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
#else
constexpr int kTile = 4;
#endif

#ifdef MLXD_X86
// exp(x) for x <= 0 .. 88 (Cephes' degree-5 polynomial on [-ln2/2, ln2/2], ~2 ulp).
inline vec vexp(vec x) {
  x = V(max_ps)(V(min_ps)(x, vset(88.0f)), vset(-87.0f));
  const vec n = vround(V(mul_ps)(x, vset(1.44269504088896341f)));
  vec r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, V(mul_ps)(r, r), V(add_ps)(r, vset(1.0f)));
  return vpow2(p, n);
}

constexpr int kVecs = 32 / kLanes; // vectors per 32-weight block

// The block's 32 weight values q (0..2^bits-1) in natural order, as kVecs float vectors.
template <int BITS>
inline void unpack(const uint8_t* row, int g, vec* q) {
  __m128i lo16, hi16; // weights 0..15 and 16..31 as bytes
  if constexpr (BITS == 4) {
    // MLX packs weight 2i in the low nibble of byte i and 2i+1 in the high one.
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    lo16 = _mm_unpacklo_epi8(lo, hi);
    hi16 = _mm_unpackhi_epi8(lo, hi);
  } else {
    lo16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32));
    hi16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 32 + 16));
  }
#ifdef MLXD_AVX512
  q[0] = bytes_to_vec(lo16);
  q[1] = bytes_to_vec(hi16);
#else
  q[0] = bytes_to_vec(lo16);
  q[1] = bytes_to_vec(_mm_srli_si128(lo16, 8));
  q[2] = bytes_to_vec(hi16);
  q[3] = bytes_to_vec(_mm_srli_si128(hi16, 8));
#endif
}

// The block's 32 dequantized weights (q * scale + bias) into kVecs vectors.
template <int BITS>
inline void dequant_block(const uint8_t* row, int g, float s, float b, vec* w) {
  unpack<BITS>(row, g, w);
  for (int v = 0; v < kVecs; ++v) {
    w[v] = vfma(w[v], vset(s), vset(b));
  }
}

// MT rows of x against NR weight rows (NR > 1 reads each x vector once for several rows of W).
template <int BITS, int MT, int NR>
inline void tile(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const float* x,
    int K, int ldy, float* y) {
  const int nb = K / kGroup;
  vec acc[NR][MT];
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      acc[i][r] = vzero();
    }
  }
  for (int g = 0; g < nb; ++g) {
    vec w[NR][kVecs];
    for (int i = 0; i < NR; ++i) {
      dequant_block<BITS>(wrows[i], g, sf[i][g], bf[i][g], w[i]);
    }
    for (int r = 0; r < MT; ++r) {
      const float* xr = x + static_cast<size_t>(r) * K + g * kGroup;
      for (int v = 0; v < kVecs; ++v) {
        const vec xv = vload(xr + v * kLanes);
        for (int i = 0; i < NR; ++i) {
          acc[i][r] = vfma(w[i][v], xv, acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      y[static_cast<size_t>(r) * ldy + i] = vsum(acc[i][r]);
    }
  }
}
#else
template <int BITS>
inline float weight(const uint8_t* row, int k) {
  return BITS == 4 ? (row[k / 2] >> ((k & 1) * 4)) & 15 : row[k];
}

template <int BITS, int MT, int NR>
inline void tile(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const float* x,
    int K, int ldy, float* y) {
  const int nb = K / kGroup;
  for (int i = 0; i < NR; ++i) {
    float acc[MT] = {};
    float w[kGroup];
    for (int g = 0; g < nb; ++g) {
      for (int k = 0; k < kGroup; ++k) {
        w[k] = weight<BITS>(wrows[i], g * kGroup + k) * sf[i][g] + bf[i][g];
      }
      for (int r = 0; r < MT; ++r) {
        const float* xr = x + static_cast<size_t>(r) * K + g * kGroup;
        float s = 0.f;
        for (int k = 0; k < kGroup; ++k) {
          s += w[k] * xr[k];
        }
        acc[r] += s;
      }
    }
    for (int r = 0; r < MT; ++r) {
      y[static_cast<size_t>(r) * ldy + i] = acc[r];
    }
  }
}
#endif

// Rows m .. m + MT of x against NR weight rows; the last `left` (< kTile) rows pick MT == left.
template <int BITS, int MT, int NR>
inline void rest(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const float* x,
    int K, float* y, int ldy, int left) {
  if constexpr (MT > 0) {
    if (left == MT) {
      tile<BITS, MT, NR>(wrows, sf, bf, x, K, ldy, y);
    } else {
      rest<BITS, MT - 1, NR>(wrows, sf, bf, x, K, y, ldy, left);
    }
  }
}

struct Rows {
  const uint8_t* w; // the row's packed weights
  const char* s; // its scales and biases
  const char* b;
};

Rows row_at(const QWeight& W, int n) {
  const size_t nb = W.K / kGroup, sbytes = W.stype == SType::F32 ? 4 : 2;
  return {
      W.w + static_cast<size_t>(n) * W.K * W.bits / 8,
      static_cast<const char*>(W.scales) + n * nb * sbytes,
      static_cast<const char*>(W.biases) + n * nb * sbytes};
}

inline void prefetch(const void* p, size_t bytes) {
#ifdef MLXD_X86
  for (size_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
  }
#endif
}

template <int BITS>
void qdot(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1) {
  for_row_groups(W, n0, n1, [&]<int NR>(const RowGroup& g) {
    float* yg = y + (g.n - n0);
    int m = 0;
    for (; m + kTile <= a.M; m += kTile) {
      tile<BITS, kTile, NR>(g.w, g.s, g.b, a.x + static_cast<size_t>(m) * W.K, W.K, ldy, yg + m * ldy);
    }
    rest<BITS, kTile - 1, NR>(
        g.w, g.s, g.b, a.x + static_cast<size_t>(m) * W.K, W.K, yg + m * ldy, ldy, a.M - m);
  });
}

template <int BITS>
void dequant(const QWeight& W, float* out, int n0, int n1) {
  const int nb = W.K / kGroup;
  std::vector<float> sf(nb), bf(nb);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = load_row(W, n, sf.data(), bf.data());
    float* o = out + static_cast<size_t>(n) * W.K;
    for (int g = 0; g < nb; ++g) {
#ifdef MLXD_X86
      vec w[kVecs];
      dequant_block<BITS>(row, g, sf[g], bf[g], w);
      for (int v = 0; v < kVecs; ++v) {
        vstore(o + g * kGroup + v * kLanes, w[v]);
      }
#else
      for (int k = 0; k < kGroup; ++k) {
        o[g * kGroup + k] = weight<BITS>(row, g * kGroup + k) * sf[g] + bf[g];
      }
#endif
    }
  }
}

} // namespace

const uint8_t* load_row(const QWeight& W, int n, float* sf, float* bf) {
  const Rows r = row_at(W, n);
  to_float(r.s, W.stype, sf, W.K / kGroup);
  to_float(r.b, W.stype, bf, W.K / kGroup);
  return r.w;
}

void prefetch_rows(const QWeight& W, int n, int count) {
  // The next rows are on their way from memory while this one computes.
  const Rows r = row_at(W, n);
  const size_t sbytes = (W.stype == SType::F32 ? 4 : 2) * static_cast<size_t>(W.K / kGroup);
  prefetch(r.w, static_cast<size_t>(count) * W.K * W.bits / 8);
  prefetch(r.s, count * sbytes);
  prefetch(r.b, count * sbytes);
}

void qdot_rows(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1) {
#ifdef MLXD_VNNI
  qdot_rows_i8(W, a, y, ldy, n0, n1);
#else
  if (W.bits == 4) {
    qdot<4>(W, a, y, ldy, n0, n1);
  } else {
    qdot<8>(W, a, y, ldy, n0, n1);
  }
#endif
}

void dequant_rows(const QWeight& W, float* out, int n0, int n1) {
  if (W.bits == 4) {
    dequant<4>(W, out, n0, n1);
  } else {
    dequant<8>(W, out, n0, n1);
  }
}

const char* simd_path() {
#if defined(MLXD_VNNI)
  return "avx512-vnni";
#elif defined(MLXD_AVX512)
  return "avx512";
#elif defined(MLXD_X86)
  return "avx2";
#else
  return "scalar";
#endif
}

int row_chunk(int N, int threads) {
  return std::max(16, (N / (8 * threads) + 15) / 16 * 16);
}

namespace {

// out = g * sigmoid(-a) * u with a = arg(g): silu's a is -g; GELU-tanh's is -2 z with
// z = sqrt(2 / pi) * (g + 0.044715 g^3), as 0.5 * (1 + tanh(z)) = sigmoid(2 z).
template <bool Gelu>
void act_mul(const float* g, const float* u, float* out, int n) {
  constexpr float kC = 0.7978845608028654f, kC3 = 0.044715f * 0.7978845608028654f;
#ifdef MLXD_X86
  // The tail goes through a padded vector: every value gets the same arithmetic wherever it sits.
  for (int i = 0; i < n; i += kLanes) {
    const int left = std::min(kLanes, n - i);
    alignas(64) float gt[kLanes] = {}, ut[kLanes] = {}, ot[kLanes];
    std::memcpy(gt, g + i, left * sizeof(float));
    std::memcpy(ut, u + i, left * sizeof(float));
    const vec gv = vload(gt);
    vec a = gv;
    if constexpr (Gelu) {
      a = vmul(vset(2.0f), vmul(gv, vfma(vmul(gv, gv), vset(kC3), vset(kC))));
    }
    const vec e = vexp(V(sub_ps)(vzero(), a));
    vstore(ot, V(mul_ps)(V(div_ps)(gv, V(add_ps)(vset(1.0f), e)), vload(ut)));
    std::memcpy(out + i, ot, left * sizeof(float));
  }
#else
  for (int i = 0; i < n; ++i) {
    const float a = Gelu ? 2.0f * (g[i] * (g[i] * g[i] * kC3 + kC)) : g[i];
    out[i] = g[i] / (1.0f + std::exp(-a)) * u[i];
  }
#endif
}

} // namespace

void swiglu(const float* g, const float* u, float* out, int n) {
  act_mul<false>(g, u, out, n);
}

void gelu_tanh_mul(const float* g, const float* u, float* out, int n) {
  act_mul<true>(g, u, out, n);
}

} // namespace mlxd
