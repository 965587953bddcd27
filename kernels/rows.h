// Per-row RMSNorm and RoPE arithmetic shared by the one-op kernels (fused.cpp) and the fused
// decode-layer kernels (layer.cpp): one definition, so a fused path gives the unfused one's bits.
#pragma once

#include <cmath>
#include <vector>

namespace mlxd {

// y = x * rsqrt(mean(x^2) + eps) * w over one row of d values (y may be x).
inline void rms_norm_row(const float* x, const float* w, float* y, int d, float eps) {
  float ss = 0.f;
  for (int i = 0; i < d; ++i) {
    ss += x[i] * x[i];
  }
  const float inv = 1.f / std::sqrt(ss / d + eps);
  for (int i = 0; i < d; ++i) {
    y[i] = x[i] * inv * w[i];
  }
}

// RoPE's inverse frequencies base^(-2i / dims), i < dims / 2.
inline std::vector<float> rope_inv_freqs(float base, int dims) {
  std::vector<float> inv(dims / 2);
  for (int i = 0; i < dims / 2; ++i) {
    inv[i] = std::pow(base, -static_cast<float>(2 * i) / dims);
  }
  return inv;
}

// cos and sin of the angles at position `pos` (already scaled).
inline void rope_angles(float pos, const std::vector<float>& inv, float* cs, float* sn) {
  for (size_t i = 0; i < inv.size(); ++i) {
    const float t = pos * inv[i];
    cs[i] = std::cos(t);
    sn[i] = std::sin(t);
  }
}

// One head row of D values rotated (the first `dims`; the rest copied); y may be x.
inline void rope_head(
    const float* x, float* y, const float* cs, const float* sn, int dims, int D, bool trad) {
  const int half = dims / 2;
  for (int i = 0; i < half; ++i) {
    const int i1 = trad ? 2 * i : i, i2 = trad ? 2 * i + 1 : i + half;
    const float a = x[i1], c = x[i2];
    y[i1] = a * cs[i] - c * sn[i];
    y[i2] = a * sn[i] + c * cs[i];
  }
  for (int i = dims; i < D; ++i) {
    y[i] = x[i];
  }
}

} // namespace mlxd
