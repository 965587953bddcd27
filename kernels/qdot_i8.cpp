// int8-activation dot products on AVX-512 VNNI (see qdot_i8.h).
#include "qdot_i8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef MLXD_VNNI
#include <immintrin.h>
#endif

namespace mlxd {

#ifdef MLXD_VNNI
namespace {

// Even then odd positions of a 32-value block: 4-bit weight 2i sits in byte i's low nibble.
const __m512i kEven = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
const __m512i kOdd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);

constexpr int center(int bits) {
  return bits == 4 ? 8 : 128;
}

inline __m128i to_i8(__m512 v, __m512 id) {
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, id)));
}

void quantize_block(const float* x, int bits, int8_t* q, float* d, float* sum, int32_t* corr) {
  __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  const float step = amax / 127.0f;
  *d = step / 256.0f; // the unit of 256 * q1 + q2
  // Blocks of (near) zeros quantize to zeros (127 / amax would overflow).
  const __m512 id = _mm512_set1_ps(amax > 1e-30f ? 127.0f / amax : 0.0f);
  if (bits == 4) {
    const __m512 even = _mm512_permutex2var_ps(lo, kEven, hi);
    hi = _mm512_permutex2var_ps(lo, kOdd, hi);
    lo = even;
  }
  // q1 = round(x / step), then q2 = round(256 * (x - q1 * step) / step): ~15 bits in all.
  const __m512 s = _mm512_set1_ps(step), id2 = _mm512_mul_ps(id, _mm512_set1_ps(256.0f));
  const __m512 q1lo = _mm512_roundscale_ps(_mm512_mul_ps(lo, id), _MM_FROUND_TO_NEAREST_INT);
  const __m512 q1hi = _mm512_roundscale_ps(_mm512_mul_ps(hi, id), _MM_FROUND_TO_NEAREST_INT);
  const __m512 rlo = _mm512_fnmadd_ps(q1lo, s, lo), rhi = _mm512_fnmadd_ps(q1hi, s, hi);
  const __m512 one = _mm512_set1_ps(1.0f);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), to_i8(q1lo, one));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), to_i8(q1hi, one));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32), to_i8(rlo, id2));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 48), to_i8(rhi, id2));
  const __m256i c = _mm256_set1_epi8(static_cast<char>(center(bits)));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
  const __m256i zero = _mm256_setzero_si256();
  const __m256i cs = _mm256_add_epi32(
      _mm256_slli_epi32(_mm256_dpbusd_epi32(zero, c, x1), 8), _mm256_dpbusd_epi32(zero, c, x2));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(corr), _mm256_sub_epi32(zero, cs));
}

// A block's 32 weights as unsigned bytes, in the order quantize_block put x in.
template <int BITS>
inline __m256i weights(const uint8_t* row, int g) {
  if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 32));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The most rows of x a tile reads its weight rows' passes for; a call's rows split into the
// fewest tiles, of near-equal sizes: a speculative verify pass of one row (1 + 8 drafts, the
// default) is one tile, where a tile of 8 and one of 1 unpacked every weight pass twice (SmolLM2's
// 30 layers, 1 row x 9 positions, in-process interleaved: 0.96-0.97x the time; 16 rows the same).
constexpr int kTile = 9;

// ---- 8 blocks a pass, one int32 lane per block -------------------------------------------------
// Summing a block's 8 VNNI lanes and scaling it block by block cost ~8 instructions a block and
// row, where the two VNNI instructions are the work; so the lanes of a pass hold 8 different
// blocks (weights transposed in registers, activations laid out so by quantize_acts), the int32
// sums of a block finish in its lane, and one convert and FMA scale 8 blocks (one thread,
// 2026-11-30: 4-bit 1536x576 at 9 rows 447 -> 304 us, at 1 row 90 -> 88). Lane l holds block
// kLane[l]: the order the dword transpose of two blocks per vector (4-bit: whole packed blocks;
// 8-bit: their first or second 16 bytes) leaves them in.
// The scales and biases are read as stored (8 a pass, converted in registers) and the blocks
// past the last full pass (K = 576: 2 of 18) go one by one: a pass costs the same for 2 live
// blocks as for 8.
constexpr int kLane[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// u[t], t < 4: dword t of each 128-bit half of l[0..3]; when l[j] holds blocks 2j and 2j + 1 (a
// half each), lane l of u[t] comes from block kLane[l].
inline void transpose4(const __m256i* l, __m256i* u) {
  const __m256i t0 = _mm256_unpacklo_epi32(l[0], l[1]), t1 = _mm256_unpackhi_epi32(l[0], l[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(l[2], l[3]), t3 = _mm256_unpackhi_epi32(l[2], l[3]);
  u[0] = _mm256_unpacklo_epi64(t0, t2);
  u[1] = _mm256_unpackhi_epi64(t0, t2);
  u[2] = _mm256_unpacklo_epi64(t1, t3);
  u[3] = _mm256_unpackhi_epi64(t1, t3);
}

// w[t], t < 8: dword t of blocks g0 .. g0 + 7 of a row (as weights<BITS> orders a block's
// values), lane l holding block g0 + kLane[l].
template <int BITS>
inline void weights_t(const uint8_t* row, int g0, __m256i* w) {
  const uint8_t* p = row + static_cast<size_t>(g0) * BITS * 4;
  __m256i l[4];
  if constexpr (BITS == 4) { // l[j]: packed blocks 2j and 2j + 1
    for (int j = 0; j < 4; ++j) {
      l[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * j));
    }
    __m256i u[4];
    transpose4(l, u);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < 4; ++t) {
      w[t] = _mm256_and_si256(u[t], m4); // low nibbles: the block's even values
      w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(u[t], 4), m4); // high: the odd ones
    }
  } else { // l[j]: the first (then second) 16 bytes of blocks 2j and 2j + 1
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 4; ++j) {
        const uint8_t* b = p + 64 * j + 16 * h;
        l[j] = _mm256_loadu2_m128i(
            reinterpret_cast<const __m128i*>(b + 32), reinterpret_cast<const __m128i*>(b));
      }
      transpose4(l, w + 4 * h);
    }
  }
}

// A stored row's scales (or biases): 8 from block g0 as float in kLane order, or one.
inline __m256 load8(const void* p, SType t, int g0) {
  const __m256i lanes = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  __m256 v;
  if (t == SType::F32) {
    v = _mm256_loadu_ps(static_cast<const float*>(p) + g0);
  } else {
    const auto* h16 = static_cast<const uint16_t*>(p) + g0;
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h16));
    v = t == SType::F16
        ? _mm256_cvtph_ps(h)
        : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_permutevar8x32_ps(v, lanes);
}

inline float load1(const void* p, SType t, int g) {
  if (t == SType::F32) {
    return static_cast<const float*>(p)[g];
  }
  const uint16_t h = static_cast<const uint16_t*>(p)[g];
  if (t == SType::F16) {
    return _cvtsh_ss(h);
  }
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// NR packed weight rows with their stored scales and biases.
struct Rows {
  const uint8_t* w[2];
  const void* s[2];
  const void* b[2];
  SType t;
};

// MT rows of x (from row m) against NR weight rows: y = sum over blocks of s * d * (q_w - c) .
// (256 * q1 + q2) + (b + c * s) * sum(x) (c = center(BITS)), in one order for a row whatever MT
// is.
template <int BITS, int MT, int NR>
void tile(const Rows& R, const Acts& a, int m, float* y, int ldy) {
  const int nb = a.K / kGroup, ng = nb / 8;
  __m256 acc[NR][MT];
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      acc[i][r] = _mm256_setzero_ps();
    }
  }
  for (int G = 0; G < ng; ++G) {
    const int g0 = G * 8;
    __m256i w[NR][8];
    __m256 s[NR], bc[NR];
    for (int i = 0; i < NR; ++i) {
      weights_t<BITS>(R.w[i], g0, w[i]);
      s[i] = load8(R.s[i], R.t, g0);
      const __m256 cf = _mm256_set1_ps(center(BITS)); // c * s is exact
      bc[i] = _mm256_fmadd_ps(s[i], cf, load8(R.b[i], R.t, g0));
    }
    for (int r = 0; r < MT; ++r) {
      const size_t rg = static_cast<size_t>(m + r) * ng + G;
      const int8_t* xg = a.qt.data() + rg * 512;
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.ct.data() + rg * 8));
      // Two accumulators per level and row (even and odd t): int32 sums are exact in any order,
      // and one row's single row pass then has 8 independent VNNI chains, not 4.
      __m256i a1[NR][2], a2[NR][2];
      for (int i = 0; i < NR; ++i) {
        a1[i][0] = a1[i][1] = a2[i][1] = _mm256_setzero_si256();
        a2[i][0] = c;
      }
      for (int t = 0; t < 8; ++t) {
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + t * 32));
        const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 256 + t * 32));
        for (int i = 0; i < NR; ++i) {
          a1[i][t & 1] = _mm256_dpbusd_epi32(a1[i][t & 1], w[i][t], x1);
          a2[i][t & 1] = _mm256_dpbusd_epi32(a2[i][t & 1], w[i][t], x2);
        }
      }
      const __m256 d = _mm256_loadu_ps(a.dt.data() + rg * 8);
      const __m256 xs = _mm256_loadu_ps(a.st.data() + rg * 8);
      for (int i = 0; i < NR; ++i) {
        // sum((q_w - center) * (256 * q1 + q2)) of each block, then its scale, then the bias
        const __m256i p1 = _mm256_add_epi32(a1[i][0], a1[i][1]);
        const __m256i p2 = _mm256_add_epi32(a2[i][0], a2[i][1]);
        const __m256i p = _mm256_add_epi32(_mm256_slli_epi32(p1, 8), p2);
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(s[i], d), acc[i][r]);
        acc[i][r] = _mm256_fmadd_ps(bc[i], xs, acc[i][r]);
      }
    }
  }
  float part[NR][MT];
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      part[i][r] = hsum(acc[i][r]);
      acc[i][r] = _mm256_setzero_ps();
    }
  }
  // The blocks past the last full pass, one by one (8 partial sums a block and row).
  float bias[NR][MT] = {};
  for (int g = ng * 8; g < nb; ++g) {
    __m256i w[NR];
    float sg[NR], bg[NR];
    for (int i = 0; i < NR; ++i) {
      w[i] = weights<BITS>(R.w[i], g);
      sg[i] = load1(R.s[i], R.t, g);
      bg[i] = load1(R.b[i], R.t, g) + center(BITS) * sg[i];
    }
    for (int r = 0; r < MT; ++r) {
      const size_t row = static_cast<size_t>(m + r);
      const int8_t* xb = a.q.data() + (row * a.K + g * kGroup) * 2;
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
      const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32));
      const float d = a.d[row * nb + g], xs = a.sum[row * nb + g];
      const __m256i corr = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(a.corr.data() + (row * nb + g) * 8));
      for (int i = 0; i < NR; ++i) {
        const __m256i p1 = _mm256_slli_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w[i], x1), 8);
        const __m256i p = _mm256_add_epi32(_mm256_dpbusd_epi32(corr, w[i], x2), p1);
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sg[i] * d), acc[i][r]);
        bias[i][r] += bg[i] * xs;
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      y[static_cast<size_t>(r) * ldy + i] = part[i][r] + (hsum(acc[i][r]) + bias[i][r]);
    }
  }
}

// Rows m .. m + left of x (left <= MT) by tile<BITS, left, NR>.
template <int BITS, int MT, int NR>
inline void rest(const Rows& R, const Acts& a, int m, float* y, int ldy, int left) {
  if constexpr (MT > 0) {
    if (left == MT) {
      tile<BITS, MT, NR>(R, a, m, y, ldy);
    } else {
      rest<BITS, MT - 1, NR>(R, a, m, y, ldy, left);
    }
  }
}

// Rows [n0, n1) of W in pairs (then one), the pairs kAhead further on prefetched.
template <int BITS>
void qdot(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1) {
  const size_t nb = W.K / kGroup, sbytes = (W.stype == SType::F32 ? 4 : 2) * nb;
  auto rows = [&]<int NR>(int n) {
    Rows R{{}, {}, {}, W.stype};
    for (int i = 0; i < NR; ++i) {
      R.w[i] = W.w + static_cast<size_t>(n + i) * W.K * BITS / 8;
      R.s[i] = static_cast<const char*>(W.scales) + (n + i) * sbytes;
      R.b[i] = static_cast<const char*>(W.biases) + (n + i) * sbytes;
    }
    if (n + (kAhead + 1) * NR <= W.N) {
      prefetch_rows(W, n + kAhead * NR, NR);
    }
    float* yn = y + (n - n0);
    const int tiles = (a.M + kTile - 1) / kTile;
    for (int k = 0, m = 0; k < tiles; ++k) {
      const int mt = (a.M - m + tiles - k - 1) / (tiles - k);
      rest<BITS, kTile, NR>(R, a, m, yn + m * ldy, ldy, mt);
      m += mt;
    }
  };
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    rows.template operator()<2>(n);
  }
  for (; n < n1; ++n) {
    rows.template operator()<1>(n);
  }
}

// Acts' per-pass layout for tile (after the blocks are quantized), full passes only.
void transpose_acts(Acts& a) {
  const int nb = a.K / kGroup, ng = nb / 8;
  a.qt.resize(static_cast<size_t>(a.M) * ng * 512);
  a.dt.resize(static_cast<size_t>(a.M) * ng * 8);
  a.ct.resize(static_cast<size_t>(a.M) * ng * 8);
  a.st.resize(static_cast<size_t>(a.M) * ng * 8);
  for (int m = 0; m < a.M; ++m) {
    for (int G = 0; G < ng; ++G) {
      const size_t rg = static_cast<size_t>(m) * ng + G;
      for (int l = 0; l < 8; ++l) {
        const size_t mb = static_cast<size_t>(m) * nb + G * 8 + kLane[l];
        const int8_t* src = a.q.data() + mb * 64;
        for (int h = 0; h < 2; ++h) {
          for (int t = 0; t < 8; ++t) {
            int8_t* dst = a.qt.data() + rg * 512 + ((h * 8 + t) * 8 + l) * 4;
            std::memcpy(dst, src + h * 32 + t * 4, 4);
          }
        }
        a.dt[rg * 8 + l] = a.d[mb];
        a.st[rg * 8 + l] = a.sum[mb];
        int32_t total = 0;
        for (int j = 0; j < 8; ++j) {
          total += a.corr[mb * 8 + j];
        }
        a.ct[rg * 8 + l] = total;
      }
    }
  }
}

} // namespace

void quantize_acts(const float* x, int M, int K, int bits, Acts& a) {
  a.x = x;
  a.M = M;
  a.K = K;
  a.bits = bits;
  const int nb = K / kGroup;
  a.q.resize(static_cast<size_t>(M) * K * 2);
  a.d.resize(static_cast<size_t>(M) * nb);
  a.sum.resize(static_cast<size_t>(M) * nb);
  a.corr.resize(static_cast<size_t>(M) * nb * 8);
  for (size_t b = 0; b < static_cast<size_t>(M) * nb; ++b) {
    quantize_block(
        x + b * kGroup, bits, a.q.data() + b * kGroup * 2, &a.d[b], &a.sum[b], &a.corr[b * 8]);
  }
  transpose_acts(a);
}

void qdot_rows_i8(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1) {
  if (W.bits == 4) {
    qdot<4>(W, a, y, ldy, n0, n1);
  } else {
    qdot<8>(W, a, y, ldy, n0, n1);
  }
}

#elif !defined(MLXD_SDOT) // (SDOT: qdot_sdot.cpp)

void quantize_acts(const float* x, int M, int K, int bits, Acts& a) {
  a.x = x;
  a.M = M;
  a.K = K;
  a.bits = bits;
}

#endif

} // namespace mlxd
