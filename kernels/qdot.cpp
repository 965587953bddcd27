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
#ifdef MLXD_NEON
  for (; i + 4 <= n; i += 4) { // FCVTL: base AArch64, whatever the scalar fp16 support
    vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + i))));
  }
#endif
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(*reinterpret_cast<const mlx::core::float16_t*>(s + i));
  }
#endif
}

// ---- SIMD (simd.h), and what only these kernels use ---------------------------------------
#if defined(MLXD_AVX512)
constexpr int kTile = 8; // rows of x per tile: 2 * 8 accumulators + 4 weight vectors fit 32 zmm
inline vec bytes_to_vec(__m128i b) { // 16 unsigned bytes -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#elif defined(MLXD_X86)
constexpr int kTile = 4;
inline vec bytes_to_vec(__m128i b) { // the low 8 unsigned bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
#elif defined(MLXD_NEON)
constexpr int kTile = 6; // 2 * 6 accumulators + 16 weight vectors + x: 29 of 32 registers
inline void bytes_to_vecs(uint8x16_t b, vec* q) { // 16 unsigned bytes -> 4 vectors of 4 floats
  const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_high_u8(b);
  q[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
  q[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
  q[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
  q[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}
#else
constexpr int kTile = 4;
#endif

#ifdef MLXD_SIMD
constexpr int kVecs = 32 / kLanes; // vectors per 32-weight block

// The block's 32 weight values q (0..2^bits-1) in natural order, as kVecs float vectors.
template <int BITS>
inline void unpack(const uint8_t* row, int g, vec* q) {
#ifdef MLXD_NEON
  uint8x16_t lo16, hi16; // weights 0..15 and 16..31 as bytes
  if constexpr (BITS == 4) {
    // MLX packs weight 2i in the low nibble of byte i and 2i+1 in the high one.
    const uint8x16_t v = vld1q_u8(row + g * 16);
    const uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(v, 4);
    lo16 = vzip1q_u8(lo, hi);
    hi16 = vzip2q_u8(lo, hi);
  } else {
    lo16 = vld1q_u8(row + g * 32);
    hi16 = vld1q_u8(row + g * 32 + 16);
  }
  bytes_to_vecs(lo16, q);
  bytes_to_vecs(hi16, q + 4);
#else
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
#elif defined(MLXD_NEON)
  for (size_t o = 0; o < bytes; o += 64) {
    __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3); // PRFM PLDL1KEEP
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
#ifdef MLXD_SIMD
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
#if defined(MLXD_VNNI) || defined(MLXD_SDOT)
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
#elif defined(MLXD_SDOT)
  return "neon-dotprod";
#elif defined(MLXD_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

int row_chunk(int N, int threads) {
  return std::max(16, (N / (8 * threads) + 15) / 16 * 16);
}

} // namespace mlxd
