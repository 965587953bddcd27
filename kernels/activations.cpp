// The MLP activations behind the fused MLP (qdot.h's swiglu and gelu_tanh_mul), on the SIMD
// vector of simd.h with a Cephes exp.
#include "qdot.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd.h"

namespace mlxd {

namespace {

#if defined(MLXD_AVX512)
inline vec vround(vec v) {
  return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vec vpow2(vec p, vec n) { // p * 2^n for integral n
  return _mm512_scalef_ps(p, n);
}
#elif defined(MLXD_X86)
inline vec vround(vec v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vec vpow2(vec p, vec n) {
  __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
#elif defined(MLXD_NEON)
inline vec vround(vec v) {
  return vrndnq_f32(v); // to nearest, ties to even: as the x86 paths
}
inline vec vpow2(vec p, vec n) {
  const int32x4_t e = vshlq_n_s32(vcvtq_s32_f32(n), 23);
  return vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(p), e));
}
#endif

#ifdef MLXD_SIMD
// exp(x) for x <= 0 .. 88 (Cephes' degree-5 polynomial on [-ln2/2, ln2/2], ~2 ulp).
inline vec vexp(vec x) {
  x = vmax(vmin(x, vset(88.0f)), vset(-87.0f));
  const vec n = vround(vmul(x, vset(1.44269504088896341f)));
  vec r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
  return vpow2(p, n);
}
#endif

// out = g * sigmoid(-a) * u with a = arg(g): silu's a is -g; GELU-tanh's is -2 z with
// z = sqrt(2 / pi) * (g + 0.044715 g^3), as 0.5 * (1 + tanh(z)) = sigmoid(2 z).
template <bool Gelu>
void act_mul(const float* g, const float* u, float* out, int n) {
  constexpr float kC = 0.7978845608028654f, kC3 = 0.044715f * 0.7978845608028654f;
#ifdef MLXD_SIMD
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
    const vec e = vexp(vsub(vzero(), a));
    vstore(ot, vmul(vdiv(gv, vadd(vset(1.0f), e)), vload(ut)));
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
