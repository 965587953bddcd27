// A vectorized float32 exp for the kernels (MLX's CPU exp costs ~23 ns an element).
// exp(x) = 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two parts so r is
// exact), e^r by Cephes' degree-7 minimax polynomial: within 2 ulp of std::exp for
// x in [-87.3, 88.7]; below that it flushes to 0 (softmax weights that small are 0 in MLX too).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace mlxd::vexp {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kMin = -87.3365447f; // exp(kMin) is the smallest normal float
constexpr float kMax = 88.7228391f;
constexpr float kP[6] = {
    1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp1(float x) {
  if (!(x >= kMin)) {
    return x != x ? x : 0.f; // NaN stays NaN; -inf and tiny values flush to 0
  }
  x = x > kMax ? kMax : x;
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = kP[0];
  for (int i = 1; i < 6; ++i) {
    p = p * r + kP[i];
  }
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return y * two_n;
}

#if defined(__AVX512F__)
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMin), _CMP_NGE_UQ);
  // Read before the clamp: min_ps(NaN, kMax) is kMax, which would lose the NaN.
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512 xin = x;
  x = _mm512_min_ps(x, _mm512_set1_ps(kMax));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP[i]));
  }
  __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  y = _mm512_scalef_ps(y, n);
  // NaN lanes keep their NaN, the rest below kMin give 0.
  y = _mm512_mask_mov_ps(y, tiny, _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, nan, xin);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kMin), _CMP_NGE_UQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xin = x;
  x = _mm256_min_ps(x, _mm256_set1_ps(kMax));
  x = _mm256_max_ps(x, _mm256_set1_ps(kMin));
  const __m256 n = _mm256_round_ps(
      _mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
  }
  __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_andnot_ps(tiny, y);
  return _mm256_blendv_ps(y, xin, nan);
}
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
inline float32x4_t exp4(float32x4_t x) {
  // As exp8: lanes below kMin give 0, NaN lanes return their input.
  const uint32x4_t tiny = vcltq_f32(x, vdupq_n_f32(kMin));
  const uint32x4_t nan = vmvnq_u32(vceqq_f32(x, x));
  const float32x4_t xin = x;
  x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(kMax)), vdupq_n_f32(kMin));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(kLog2e)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(kLn2Hi));
  r = vfmsq_f32(r, n, vdupq_n_f32(kLn2Lo));
  float32x4_t p = vdupq_n_f32(kP[0]);
  for (int i = 1; i < 6; ++i) {
    p = vfmaq_f32(vdupq_n_f32(kP[i]), p, r);
  }
  float32x4_t y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), vmulq_f32(p, r), r);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  y = vmulq_f32(y, vreinterpretq_f32_s32(e));
  y = vbslq_f32(tiny, vdupq_n_f32(0.f), y);
  return vbslq_f32(nan, xin, y);
}
#endif

// x[i] = exp(x[i] - shift) for i < n; returns their sum (summed in lanes by index, so the
// result depends only on the values, not on where the array sits).
inline float exp_shifted_sum(float* x, int n, float shift) {
  int i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float l : lanes) {
    total += l;
  }
#elif defined(__aarch64__) && defined(__ARM_NEON)
  const float32x4_t s = vdupq_n_f32(shift);
  float32x4_t acc = vdupq_n_f32(0.f);
  for (; i + 4 <= n; i += 4) {
    const float32x4_t e = exp4(vsubq_f32(vld1q_f32(x + i), s));
    vst1q_f32(x + i, e);
    acc = vaddq_f32(acc, e);
  }
  total = vaddvq_f32(acc);
#endif
  for (; i < n; ++i) {
    x[i] = exp1(x[i] - shift);
    total += x[i];
  }
  return total;
}

} // namespace mlxd::vexp
