// Block-quantized matmul on the CPU: weights stay 4 or 8 bits in memory (the bandwidth a decode
// step is bound by) and are dequantized block by block in registers.
#include "qmm.h"
#include "packed.h"
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#define MLXD_X86 1
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

constexpr int kGroup = 32;

// ---- scales and biases to float ------------------------------------------------------------
enum class SType { F32, F16, BF16 };

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
    dst[i] = static_cast<float>(*reinterpret_cast<const mx::float16_t*>(s + i));
  }
#endif
}

// ---- the matmul --------------------------------------------------------------------------
// Each 32-weight block is dequantized in registers (q * scale + bias, in float32) and multiplied
// with float32 activations by FMAs; a block is unpacked once for a tile of up to kTile rows of x.
// The result is the fp32 product with the dequantized weights (no activation rounding), and each
// row sums in the same order alone or in any batch.
struct Job {
  const float* x;
  const uint8_t* w;
  const void* scales;
  const void* biases;
  SType stype;
  float* y;
  int M, N, K, bits;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MLXD_AVX512 1
constexpr int kTile = 8;
using vec = __m512;
constexpr int kLanes = 16;
inline vec vzero() {
  return _mm512_setzero_ps();
}
inline vec vload(const float* p) {
  return _mm512_loadu_ps(p);
}
inline vec vset(float v) {
  return _mm512_set1_ps(v);
}
inline vec vfma(vec a, vec b, vec c) {
  return _mm512_fmadd_ps(a, b, c);
}
inline float vsum(vec v) {
  return _mm512_reduce_add_ps(v);
}
inline vec bytes_to_vec(__m128i b) { // 16 unsigned bytes -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#elif defined(MLXD_X86)
constexpr int kTile = 4;
using vec = __m256;
constexpr int kLanes = 8;
inline vec vzero() {
  return _mm256_setzero_ps();
}
inline vec vload(const float* p) {
  return _mm256_loadu_ps(p);
}
inline vec vset(float v) {
  return _mm256_set1_ps(v);
}
inline vec vfma(vec a, vec b, vec c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef MLXD_X86
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
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo16));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo16, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi16));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi16, 8)));
#endif
}

// MT rows of x against NR weight rows (NR > 1 reads each x vector once for several rows of W).
template <int BITS, int MT, int NR>
inline void tile(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const float* x,
    int K, int N, float* y) {
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
      unpack<BITS>(wrows[i], g, w[i]);
      const vec s = vset(sf[i][g]), b = vset(bf[i][g]);
      for (int v = 0; v < kVecs; ++v) {
        w[i][v] = vfma(w[i][v], s, b);
      }
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
      y[static_cast<size_t>(r) * N + i] = vsum(acc[i][r]);
    }
  }
}
#else
constexpr int kTile = 4;

template <int BITS, int MT, int NR>
inline void tile(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const float* x,
    int K, int N, float* y) {
  const int nb = K / kGroup;
  for (int i = 0; i < NR; ++i) {
    const uint8_t* row = wrows[i];
    float acc[MT] = {};
    float w[kGroup];
    for (int g = 0; g < nb; ++g) {
      for (int k = 0; k < kGroup; ++k) {
        int q = BITS == 4 ? (row[g * 16 + k / 2] >> ((k & 1) * 4)) & 15 : row[g * 32 + k];
        w[k] = static_cast<float>(q) * sf[i][g] + bf[i][g];
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
      y[static_cast<size_t>(r) * N + i] = acc[r];
    }
  }
}
#endif

constexpr int kRows = 2; // weight rows per tile

// Rows n .. n + NR of W against rows m .. m + MT of x.
template <int BITS, int MT, int NR>
inline void tail(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const Job& j,
    int m, int n) {
  tile<BITS, MT, NR>(
      wrows, sf, bf, j.x + static_cast<size_t>(m) * j.K, j.K, j.N,
      j.y + static_cast<size_t>(m) * j.N + n);
}

// The last `left` (< kTile) rows of x.
template <int BITS, int MT, int NR>
inline void rest(
    const uint8_t* const* wrows, const float* const* sf, const float* const* bf, const Job& j,
    int m, int n, int left) {
  if constexpr (MT > 0) {
    if (left == MT) {
      tail<BITS, MT, NR>(wrows, sf, bf, j, m, n);
    } else {
      rest<BITS, MT - 1, NR>(wrows, sf, bf, j, m, n, left);
    }
  }
}

template <int BITS, int NR>
void row_group(const Job& j, int n, std::vector<float>* sfv, std::vector<float>* bfv) {
  const int nb = j.K / kGroup;
  const size_t row_bytes = static_cast<size_t>(j.K) * BITS / 8;
  const size_t sbytes = j.stype == SType::F32 ? 4 : 2;
  const uint8_t* wrows[NR];
  const float* sf[NR];
  const float* bf[NR];
  for (int i = 0; i < NR; ++i) {
    wrows[i] = j.w + (n + i) * row_bytes;
    to_float(static_cast<const char*>(j.scales) + (n + i) * nb * sbytes, j.stype, sfv[i].data(), nb);
    to_float(static_cast<const char*>(j.biases) + (n + i) * nb * sbytes, j.stype, bfv[i].data(), nb);
    sf[i] = sfv[i].data();
    bf[i] = bfv[i].data();
  }
  int m = 0;
  for (; m + kTile <= j.M; m += kTile) {
    tail<BITS, kTile, NR>(wrows, sf, bf, j, m, n);
  }
  rest<BITS, kTile - 1, NR>(wrows, sf, bf, j, m, n, j.M - m);
}

template <int BITS>
void rows(const Job& j, int n0, int n1) {
  const int nb = j.K / kGroup;
  std::vector<float> sfv[kRows], bfv[kRows];
  for (int i = 0; i < kRows; ++i) {
    sfv[i].resize(nb);
    bfv[i].resize(nb);
  }
  int n = n0;
  for (; n + kRows <= n1; n += kRows) {
    row_group<BITS, kRows>(j, n, sfv, bfv);
  }
  for (; n < n1; ++n) {
    row_group<BITS, 1>(j, n, sfv, bfv);
  }
}

void run(const Job& j) {
  // Below ~256k multiply-adds a second thread costs more than it saves.
  const double work = static_cast<double>(j.M) * j.N * j.K;
  const int chunk = std::max(16, (j.N / (8 * pool().size()) + 15) / 16 * 16);
  const int chunks = (j.N + chunk - 1) / chunk;
  pool().run(chunks, work >= 262144.0, [&](int c) {
    const int n0 = c * chunk, n1 = std::min(j.N, n0 + chunk);
    if (j.bits == 4) {
      rows<4>(j, n0, n1);
    } else {
      rows<8>(j, n0, n1);
    }
  });
}

// Rows [n0, n1) of W as float32 (for prefill-sized batches, which the BLAS multiplies faster).
template <int BITS>
void dequant_rows(const Job& j, int n0, int n1) {
  const int nb = j.K / kGroup;
  const size_t row_bytes = static_cast<size_t>(j.K) * BITS / 8;
  const size_t sbytes = j.stype == SType::F32 ? 4 : 2;
  std::vector<float> sf(nb), bf(nb);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = j.w + n * row_bytes;
    to_float(static_cast<const char*>(j.scales) + n * nb * sbytes, j.stype, sf.data(), nb);
    to_float(static_cast<const char*>(j.biases) + n * nb * sbytes, j.stype, bf.data(), nb);
    float* out = j.y + static_cast<size_t>(n) * j.K;
    for (int g = 0; g < nb; ++g) {
#ifdef MLXD_X86
      vec w[kVecs];
      unpack<BITS>(row, g, w);
      for (int v = 0; v < kVecs; ++v) {
        w[v] = vfma(w[v], vset(sf[g]), vset(bf[g]));
#ifdef MLXD_AVX512
        _mm512_storeu_ps(out + g * kGroup + v * kLanes, w[v]);
#else
        _mm256_storeu_ps(out + g * kGroup + v * kLanes, w[v]);
#endif
      }
#else
      for (int k = 0; k < kGroup; ++k) {
        int q = BITS == 4 ? (row[g * 16 + k / 2] >> ((k & 1) * 4)) & 15 : row[g * 32 + k];
        out[g * kGroup + k] = static_cast<float>(q) * sf[g] + bf[g];
      }
#endif
    }
  }
}

void run_dequant(const Job& j) {
  // On the calling thread only: the BLAS call that follows runs its own threads, and a worker of
  // ours still spinning would take a core from it.
  const int chunk = 64;
  pool().run((j.N + chunk - 1) / chunk, false, [&](int c) {
    const int n0 = c * chunk, n1 = std::min(j.N, n0 + chunk);
    if (j.bits == 4) {
      dequant_rows<4>(j, n0, n1);
    } else {
      dequant_rows<8>(j, n0, n1);
    }
  });
}

SType stype_of(const mx::array& a) {
  switch (a.dtype()) {
    case mx::float32:
      return SType::F32;
    case mx::float16:
      return SType::F16;
    case mx::bfloat16:
      return SType::BF16;
    default:
      throw std::invalid_argument("qmm: scales and biases must be float32, float16 or bfloat16");
  }
}

} // namespace

const char* simd_path() {
#if defined(MLXD_AVX512)
  return "avx512";
#elif defined(MLXD_X86)
  return "avx2";
#else
  return "scalar";
#endif
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
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("qmm: bits must be 4 or 8");
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || scales.ndim() != 2 ||
      scales.shape() != biases.shape() || scales.dtype() != biases.dtype()) {
    throw std::invalid_argument("qmm: w must be uint32 [N, K*bits/32], scales/biases [N, K/32]");
  }
  stype_of(scales);
  const int N = w.shape(0);
  const int K = w.shape(1) * 32 / bits;
  if (x.ndim() < 1 || x.shape(-1) != K || scales.shape(0) != N || scales.shape(1) * kGroup != K) {
    throw std::invalid_argument("qmm: shapes of x, w, scales do not agree (group size 32)");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  auto xf = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, s);
  auto shape = x.shape();
  shape.back() = N;
  return mx::array(
      shape, mx::float32, std::make_shared<QMatmul>(s, bits), {xf, w, scales, biases});
}

mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits) {
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("dequantize: bits must be 4 or 8");
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || scales.ndim() != 2 ||
      scales.shape() != biases.shape() || scales.dtype() != biases.dtype() ||
      scales.shape(0) != w.shape(0) || scales.shape(1) * kGroup != w.shape(1) * 32 / bits) {
    throw std::invalid_argument("dequantize: w uint32 [N, K*bits/32], scales/biases [N, K/32]");
  }
  stype_of(scales);
  auto s = mx::default_stream(mx::Device::cpu);
  const int K = w.shape(1) * 32 / bits;
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
  const bool dequant = inputs.size() == 3; // dequantize(w, scales, biases): no x
  const int o = dequant ? 0 : 1; // where w sits
  const auto& w = inputs[o];
  const auto& x = inputs[0];
  Job j{
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      stype_of(inputs[o + 1]),
      out.data<float>(),
      dequant ? 0 : static_cast<int>(x.size() / std::max(1, x.shape(-1))),
      w.shape(0),
      w.shape(1) * 32 / bits_,
      bits_};
  std::vector<mx::array> arrs;
  for (const auto& a : inputs) {
    arrs.push_back(mx::array::unsafe_weak_copy(a));
  }
  enc.dispatch([j, o, dequant, arrs = std::move(arrs)]() mutable {
    // Strided inputs are packed here, on the stream's thread, once their data is ready.
    std::vector<char> tmp[4];
    const void* ptrs[4] = {};
    for (size_t i = 0; i < arrs.size(); ++i) {
      if (arrs[i].flags().row_contiguous) {
        ptrs[i] = arrs[i].data<void>();
      } else {
        tmp[i] = packed_copy(arrs[i]);
        ptrs[i] = tmp[i].data();
      }
    }
    j.x = dequant ? nullptr : static_cast<const float*>(ptrs[0]);
    j.w = static_cast<const uint8_t*>(ptrs[o]);
    j.scales = ptrs[o + 1];
    j.biases = ptrs[o + 2];
    if (dequant) {
      run_dequant(j);
    } else {
      run(j);
    }
  });
}

void QMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdQMatmul runs on the CPU only; use mx.quantized_matmul on GPUs");
}

} // namespace mlxd
