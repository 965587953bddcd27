#pragma once

// The float SIMD vector of this build's CPU, shared by the kernels: AVX-512 (16 lanes; with BW,
// which qdot.cpp's byte unpacking needs), AVX2 with FMA (8 lanes), or arm64's NEON (4 lanes: one
// float32x4_t, as AArch64's 32 vector registers hold the tiles' accumulators; two per vec would
// spill them). MLXD_SIMD marks a build with one of them; without it the kernels take their
// scalar paths.

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#define MLXD_X86 1
#define MLXD_SIMD 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define MLXD_NEON 1
#define MLXD_SIMD 1
#endif

namespace mlxd {

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MLXD_AVX512 1
#define V(op) _mm512_##op
using vec = __m512;
constexpr int kLanes = 16;
constexpr int kRegs = 32; // vector registers
inline float vsum(vec v) {
  return _mm512_reduce_add_ps(v);
}
#elif defined(MLXD_X86)
#define V(op) _mm256_##op
using vec = __m256;
constexpr int kLanes = 8;
constexpr int kRegs = 16;
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
inline vec vadd(vec a, vec b) {
  return V(add_ps)(a, b);
}
inline vec vsub(vec a, vec b) {
  return V(sub_ps)(a, b);
}
inline vec vmul(vec a, vec b) {
  return V(mul_ps)(a, b);
}
inline vec vdiv(vec a, vec b) {
  return V(div_ps)(a, b);
}
inline vec vmin(vec a, vec b) {
  return V(min_ps)(a, b);
}
inline vec vmax(vec a, vec b) {
  return V(max_ps)(a, b);
}
inline vec vfma(vec a, vec b, vec c) { // a * b + c, one rounding
  return V(fmadd_ps)(a, b, c);
}
#endif

#ifdef MLXD_NEON
using vec = float32x4_t;
constexpr int kLanes = 4;
constexpr int kRegs = 32;
inline float vsum(vec v) {
  return vaddvq_f32(v);
}
inline vec vzero() {
  return vdupq_n_f32(0.f);
}
inline vec vload(const float* p) {
  return vld1q_f32(p);
}
inline void vstore(float* p, vec v) {
  vst1q_f32(p, v);
}
inline vec vset(float v) {
  return vdupq_n_f32(v);
}
inline vec vadd(vec a, vec b) {
  return vaddq_f32(a, b);
}
inline vec vsub(vec a, vec b) {
  return vsubq_f32(a, b);
}
inline vec vmul(vec a, vec b) {
  return vmulq_f32(a, b);
}
inline vec vdiv(vec a, vec b) {
  return vdivq_f32(a, b);
}
inline vec vmin(vec a, vec b) {
  return vminq_f32(a, b);
}
inline vec vmax(vec a, vec b) {
  return vmaxq_f32(a, b);
}
inline vec vfma(vec a, vec b, vec c) { // a * b + c, one rounding
  return vfmaq_f32(c, a, b);
}
#endif

} // namespace mlxd
