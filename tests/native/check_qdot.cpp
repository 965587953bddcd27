// The block-quantized dot products (qdot.cpp, qdot_i8.cpp, qdot_sdot.cpp), the activations and
// the vectorized exp against double-precision references, on odd shapes.
#include "check.h"

#include <algorithm>

#include "qdot.h"
#include "qdot_i8.h"
#include "vexp.h"

namespace check {

namespace {

using mlxd::kGroup;
using mlxd::SType;

constexpr bool kIntActs =
#if defined(MLXD_VNNI) || defined(MLXD_SDOT)
    true;
#else
    false;
#endif

// v rounded to what `t` stores (bf16: truncated; f16: truncated, kept in its normal range), and
// the stored 16 bits.
float stored(float v, SType t, uint16_t* bits) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (t == SType::BF16) {
    *bits = static_cast<uint16_t>(u >> 16);
    u &= 0xFFFF0000u;
  } else if (t == SType::F16) {
    v = std::copysign(std::clamp(std::fabs(v), 1.f / 1024.f, 60000.f), v);
    std::memcpy(&u, &v, 4);
    const uint32_t e = ((u >> 23) & 0xFF) - 127 + 15;
    *bits = static_cast<uint16_t>(((u >> 16) & 0x8000u) | (e << 10) | ((u >> 13) & 0x3FFu));
    u &= 0xFFFFE000u;
  }
  std::memcpy(&v, &u, 4);
  return v;
}

struct Weight {
  int N, K, bits;
  SType t;
  std::vector<uint8_t> w; // packed as MLX does (4 bits: weight 2i low nibble of byte i)
  std::vector<uint8_t> s, b; // stored scales and biases
  std::vector<int> q; // [N, K] the quantized values
  std::vector<float> sf, bf; // [N, K / 32] their float values
  mlxd::QWeight view() const {
    return {w.data(), s.data(), b.data(), t, N, K, bits};
  }
};

Weight make_weight(int N, int K, int bits, SType t) {
  Weight W{N, K, bits, t, {}, {}, {}, {}, {}, {}};
  const int nb = K / kGroup, sb = t == SType::F32 ? 4 : 2;
  W.w.assign(static_cast<size_t>(N) * K * bits / 8, 0);
  W.s.resize(static_cast<size_t>(N) * nb * sb);
  W.b.resize(W.s.size());
  W.q.resize(static_cast<size_t>(N) * K);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      const int q = uniform(0, (1 << bits) - 1);
      W.q[static_cast<size_t>(n) * K + k] = q;
      const size_t i = static_cast<size_t>(n) * K + k;
      W.w[i * bits / 8] |= static_cast<uint8_t>(bits == 4 ? q << (4 * (k & 1)) : q);
    }
    for (int g = 0; g < nb; ++g) {
      for (int which = 0; which < 2; ++which) {
        const float v = which == 0 ? 0.001f + std::fabs(normal(0.02f)) : normal(0.3f);
        uint16_t h = 0;
        const float f = stored(v, t, &h);
        auto& dst = which == 0 ? W.s : W.b;
        std::memcpy(dst.data() + (static_cast<size_t>(n) * nb + g) * sb, t == SType::F32 ? (void*)&f : (void*)&h, sb);
        (which == 0 ? W.sf : W.bf).push_back(f);
      }
    }
  }
  return W;
}

// x as the int8 path sees it: per block, step / 256 * (256 * q1 + q2) (qdot_i8.h).
std::vector<double> int_acts(const std::vector<float>& x) {
  std::vector<double> out(x.size());
  for (size_t b0 = 0; b0 < x.size(); b0 += kGroup) {
    float amax = 0.f;
    for (int k = 0; k < kGroup; ++k) {
      amax = std::max(amax, std::fabs(x[b0 + k]));
    }
    const float step = amax / 127.0f, id = amax > 1e-30f ? 127.0f / amax : 0.0f;
    for (int k = 0; k < kGroup; ++k) {
      const float q1 = std::nearbyint(x[b0 + k] * id);
      const float r = std::fma(-q1, step, x[b0 + k]);
      const float q2 = std::clamp(std::nearbyint(r * (id * 256.0f)), -128.0f, 127.0f);
      out[b0 + k] = (256.0 * q1 + q2) * (static_cast<double>(step) / 256.0);
    }
  }
  return out;
}

void check_qdot(int M, int N, int K, int bits, SType t) {
  const Weight W = make_weight(N, K, bits, t);
  std::vector<float> x(static_cast<size_t>(M) * K);
  for (auto& v : x) {
    v = normal();
  }
  if (M > 2) { // a row of zeros, and one block with an outlier
    std::fill(x.begin() + K, x.begin() + 2 * K, 0.f);
    x[2 * K + 5] = 300.f;
  }
  const std::vector<double> xa = kIntActs ? int_acts(x) : std::vector<double>(x.begin(), x.end());
  const int nb = K / kGroup, c = 1 << (bits - 1);
  std::vector<double> ref(static_cast<size_t>(M) * N), tol(ref.size());
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double y = 0, mag = 0;
      for (int g = 0; g < nb; ++g) {
        const double s = W.sf[n * nb + g], bc = W.bf[n * nb + g] + c * s;
        double xs = 0;
        for (int k = g * kGroup; k < (g + 1) * kGroup; ++k) {
          const double xv = xa[static_cast<size_t>(m) * K + k], xt = x[static_cast<size_t>(m) * K + k];
          const int q = W.q[static_cast<size_t>(n) * K + k];
          y += xv * (q - c) * s;
          xs += xt;
          mag += std::fabs(xt) * (std::fabs((q - c) * s) + std::fabs(bc));
        }
        y += xs * bc; // the bias term on the exact sum of x (the float path: the same sum)
      }
      ref[static_cast<size_t>(m) * N + n] = y;
      tol[static_cast<size_t>(m) * N + n] = 2e-5 * mag + 1e-30;
    }
  }
  const std::string name = "qdot M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" +
      std::to_string(K) + " bits=" + std::to_string(bits) + " stype=" + std::to_string(int(t));
  mlxd::Acts a;
  mlxd::quantize_acts(x.data(), M, K, bits, a);
  std::vector<float> y(static_cast<size_t>(M) * N);
  mlxd::qdot_rows(W.view(), a, y.data(), N, 0, N);
  const double w = worst(y.data(), ref, tol);
  expect(w <= 1.0, name, "error / tolerance " + std::to_string(w));
  // Each row alone, and the rows over other ranges of N: the same bits.
  for (int m = 0; m < M; ++m) {
    mlxd::Acts a1;
    mlxd::quantize_acts(x.data() + static_cast<size_t>(m) * K, 1, K, bits, a1);
    std::vector<float> y1(N);
    const int split = N / 2 | 1;
    mlxd::qdot_rows(W.view(), a1, y1.data(), N, 0, split);
    mlxd::qdot_rows(W.view(), a1, y1.data() + split, N, split, N);
    expect(same_bits(y1.data(), y.data() + static_cast<size_t>(m) * N, N), name + " row alone", std::to_string(m));
  }
  // Dequantized rows.
  std::vector<float> dq(static_cast<size_t>(N) * K);
  mlxd::dequant_rows(W.view(), dq.data(), 0, N);
  bool ok = true;
  for (int n = 0; n < N && ok; ++n) {
    for (int k = 0; k < K && ok; ++k) {
      const double want = W.q[static_cast<size_t>(n) * K + k] * double(W.sf[n * nb + k / kGroup]) + W.bf[n * nb + k / kGroup];
      ok = std::fabs(dq[static_cast<size_t>(n) * K + k] - want) <= 1e-6 * (std::fabs(want) + 1);
    }
  }
  expect(ok, name + " dequant");
}

void check_activations() {
  for (int n : {1, 3, 4, 7, 16, 37, 100}) {
    std::vector<float> g(n), u(n), y(n), z(n);
    for (int i = 0; i < n; ++i) {
      g[i] = normal(4.f);
      u[i] = normal();
    }
    if (n > 3) {
      g[1] = -95.f; // exp(95) overflows a float: silu's limit is 0
      g[2] = 120.f;
    }
    mlxd::swiglu(g.data(), u.data(), y.data(), n);
    mlxd::gelu_tanh_mul(g.data(), u.data(), z.data(), n);
    std::vector<double> rs(n), rg(n), tol(n);
    for (int i = 0; i < n; ++i) {
      const double gv = g[i];
      rs[i] = gv / (1 + std::exp(-gv)) * u[i];
      rg[i] = 0.5 * gv * (1 + std::tanh(0.7978845608028654 * (gv + 0.044715 * gv * gv * gv))) * u[i];
      tol[i] = 2e-6 * (std::fabs(gv * u[i]) + 1e-6);
    }
    expect(worst(y.data(), rs, tol) <= 1.0, "swiglu n=" + std::to_string(n));
    expect(worst(z.data(), rg, tol) <= 1.0, "gelu_tanh_mul n=" + std::to_string(n));
  }
}

void check_exp() {
  // exp_shifted_sum over [-100, 100) with odd lengths: within 2 ulp of exp (0 below -87.34).
  for (int n : {1, 5, 17, 1001}) {
    std::vector<float> x(n), orig(n);
    for (int i = 0; i < n; ++i) {
      orig[i] = x[i] = -100.f + 200.f * (i + 0.37f) / n;
    }
    const float shift = 30.5f; // the sum stays a float
    const float total = mlxd::vexp::exp_shifted_sum(x.data(), n, shift);
    double sum = 0;
    bool ok = true;
    for (int i = 0; i < n; ++i) {
      const float a = orig[i] - shift;
      const double want = a < mlxd::vexp::kMin ? 0.0 : std::exp(static_cast<double>(a));
      ok = ok && std::fabs(x[i] - want) <= 2.5 * std::fabs(want) * 1.2e-7;
      sum += x[i];
    }
    expect(ok, "exp_shifted_sum n=" + std::to_string(n));
    expect(std::fabs(total - sum) <= 1e-5 * sum, "exp_shifted_sum total n=" + std::to_string(n),
           std::to_string(total) + " vs " + std::to_string(sum));
  }
  std::vector<float> s = {NAN, -INFINITY, 0.f, -200.f, NAN, 1.f, -INFINITY, 88.f, 3.f};
  mlxd::vexp::exp_shifted_sum(s.data(), static_cast<int>(s.size()), 0.f);
  expect(std::isnan(s[0]) && std::isnan(s[4]) && s[1] == 0.f && s[3] == 0.f && s[6] == 0.f &&
             s[2] == 1.f && std::isfinite(s[7]),
         "exp special values");
}

} // namespace

void qdot_checks() {
  const SType types[3] = {SType::F32, SType::F16, SType::BF16};
  int i = 0;
  for (int bits : {4, 8}) {
    for (int K : {32, 96, 128, 256, 288, 576, 800}) {
      // 19 rows: three tiles of 7, 6 and 6 where a tile holds up to 9 (qdot_i8.cpp)
      for (int M : {1, 2, 5, 9, 19}) {
        check_qdot(M, 1 + (K + M) % 7 + (M == 9 ? 6 : 0), K, bits, types[i++ % 3]);
      }
    }
  }
  check_activations();
  check_exp();
}

} // namespace check
