#pragma once

// The float SIMD vector of this build's CPU, shared by the kernels: AVX-512 (16 lanes; with BW,
// which qdot.cpp's byte unpacking needs) or AVX2 with FMA (8 lanes). Without MLXD_X86 the
// kernels take their scalar paths.

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#define MLXD_X86 1
#endif

namespace mlxd {

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MLXD_AVX512 1
#define V(op) _mm512_##op
using vec = __m512;
constexpr int kLanes = 16;
inline float vsum(vec v) {
  return _mm512_reduce_add_ps(v);
}
#elif defined(MLXD_X86)
#define V(op) _mm256_##op
using vec = __m256;
constexpr int kLanes = 8;
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef MLXD_X86
inline vec vzero() {
  return V(setzero_ps)();
}
inline vec vload(const float* p) {
  return V(loadu_ps)(p);
}
inline void vstore(float* p, vec v) {
  V(storeu_ps)(p, v);
}
inline vec vset(float v) {
  return V(set1_ps)(v);
}
inline vec vmul(vec a, vec b) {
  return V(mul_ps)(a, b);
}
inline vec vfma(vec a, vec b, vec c) {
  return V(fmadd_ps)(a, b, c);
}
#endif

} // namespace mlxd
