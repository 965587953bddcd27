// Attention (attention.cpp's decode kernel, attention_prefill.cpp's tiles) and fused.cpp's SwiGLU
// span against double-precision references: GQA, left padding, causal chunks, all-masked rows.
// The sources are included for their internal functions (their MLX entry points are not run).
#include "check.h"

#include "../../kernels/attention.cpp"
#include "../../kernels/fused.cpp"

namespace check {

namespace {

struct Case {
  int B, Hq, Hk, L, T, D;
  bool causal, masked;
};

std::string name_of(const Case& c) {
  char s[160];
  std::snprintf(s, sizeof s, "attention B=%d Hq=%d Hk=%d L=%d T=%d D=%d causal=%d mask=%d", c.B,
                c.Hq, c.Hk, c.L, c.T, c.D, c.causal, c.masked);
  return s;
}

struct Data {
  std::vector<float> q, k, v;
  std::vector<uint8_t> mask; // [B, L, T] (bool)
};

mlxd::Job job_of(const Case& c, const Data& d, int b0, int B, float* out) {
  const int64_t D = c.D;
  mlxd::View q{d.q.data() + b0 * c.Hq * c.L * D, c.Hq * c.L * D, c.L * D, D};
  mlxd::View k{d.k.data() + b0 * c.Hk * c.T * D, c.Hk * c.T * D, c.T * D, D};
  mlxd::View v{d.v.data() + b0 * c.Hk * c.T * D, c.Hk * c.T * D, c.T * D, D};
  const bool* m = c.masked ? reinterpret_cast<const bool*>(d.mask.data()) + b0 * c.L * c.T : nullptr;
  return {q, k, v, m, int64_t{c.L} * c.T, c.T, 1, out, B, c.Hq, c.Hk, c.L, c.T, c.D, c.D,
          1.f / std::sqrt(static_cast<float>(c.D)), c.causal};
}

void check_case(const Case& c) {
  Data d;
  d.q.resize(static_cast<size_t>(c.B) * c.Hq * c.L * c.D);
  d.k.resize(static_cast<size_t>(c.B) * c.Hk * c.T * c.D);
  d.v.resize(d.k.size());
  for (auto* a : {&d.q, &d.k, &d.v}) {
    for (auto& x : *a) {
      x = normal(a == &d.q ? 2.f : 1.f);
    }
  }
  d.mask.assign(static_cast<size_t>(c.B) * c.L * c.T, 1);
  for (int b = 0; b < c.B && c.masked; ++b) {
    const int pad = b == 0 ? 0 : uniform(1, c.T - 1); // left padding
    for (int l = 0; l < c.L; ++l) {
      for (int t = 0; t < c.T; ++t) {
        d.mask[(static_cast<size_t>(b) * c.L + l) * c.T + t] = t >= pad && uniform(0, 9) > 0;
      }
    }
    if (b == 2) { // a row of this position attends nothing
      std::fill_n(d.mask.begin() + static_cast<size_t>(b) * c.L * c.T, c.T, 0);
    }
  }
  std::vector<float> out(static_cast<size_t>(c.B) * c.Hq * c.L * c.D);
  mlxd::attention_rows(job_of(c, d, 0, c.B, out.data()));
  std::vector<double> ref(out.size()), tol(out.size());
  const int R = c.Hq / c.Hk;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  for (int b = 0; b < c.B; ++b) {
    for (int h = 0; h < c.Hq; ++h) {
      for (int l = 0; l < c.L; ++l) {
        const float* q = d.q.data() + ((static_cast<size_t>(b) * c.Hq + h) * c.L + l) * c.D;
        std::vector<double> p(c.T, 0.0);
        double top = -INFINITY, sum = 0;
        for (int t = 0; t < c.T; ++t) {
          const bool on = d.mask[(static_cast<size_t>(b) * c.L + l) * c.T + t] &&
              (!c.causal || t <= c.T - c.L + l);
          const float* k = d.k.data() + ((static_cast<size_t>(b) * c.Hk + h / R) * c.T + t) * c.D;
          double s = 0;
          for (int e = 0; e < c.D; ++e) {
            s += static_cast<double>(static_cast<float>(q[e] * static_cast<float>(scale))) * k[e];
          }
          p[t] = on ? s : -INFINITY;
          top = std::max(top, p[t]);
        }
        for (int t = 0; t < c.T; ++t) { // all masked: uniform over every key, as MLX
          p[t] = top == -INFINITY ? 1.0 : std::exp(p[t] - top);
          sum += p[t];
        }
        const size_t o = ((static_cast<size_t>(b) * c.Hq + h) * c.L + l) * c.D;
        for (int e = 0; e < c.D; ++e) {
          double y = 0, mag = 0;
          for (int t = 0; t < c.T; ++t) {
            const double vv = d.v[((static_cast<size_t>(b) * c.Hk + h / R) * c.T + t) * c.D + e];
            y += p[t] / sum * vv;
            mag += p[t] / sum * std::fabs(vv);
          }
          ref[o + e] = y;
          tol[o + e] = 2e-5 * (mag + 1e-3);
        }
      }
    }
  }
  const double w = worst(out.data(), ref, tol);
  expect(w <= 1.0, name_of(c), "error / tolerance " + std::to_string(w));
  // Each row alone: the same bits as in the batch.
  const size_t per_row = out.size() / c.B;
  for (int b = 0; b < c.B; ++b) {
    std::vector<float> one(per_row);
    mlxd::attention_rows(job_of(c, d, b, 1, one.data()));
    expect(same_bits(one.data(), out.data() + b * per_row, per_row), name_of(c) + " row alone",
           std::to_string(b));
  }
}

void check_swiglu_span() {
  for (int n : {1, 4, 9, 64, 131}) {
    std::vector<float> g(n), u(n), y(n);
    for (int i = 0; i < n; ++i) {
      g[i] = normal(5.f);
      u[i] = normal();
    }
    mlxd::swiglu_span(g.data(), u.data(), y.data(), n);
    std::vector<double> ref(n), tol(n);
    for (int i = 0; i < n; ++i) {
      ref[i] = g[i] / (1 + std::exp(-static_cast<double>(g[i]))) * u[i];
      tol[i] = 2e-6 * (std::fabs(g[i] * u[i]) + 1e-6);
    }
    expect(worst(y.data(), ref, tol) <= 1.0, "swiglu_span n=" + std::to_string(n));
  }
}

} // namespace

void attention_checks() {
  // D = 64: a head row in registers (attend<16> on NEON and AVX-512); 48: the generic loop;
  // L >= 64: the prefill tiles (attention_prefill.cpp).
  const Case cases[] = {
      {3, 6, 2, 1, 37, 64, false, true},  {3, 6, 2, 1, 300, 64, false, true},
      {2, 4, 4, 1, 19, 48, false, false}, {3, 8, 2, 3, 41, 32, true, true},
      {3, 9, 3, 5, 133, 64, true, true},  {2, 6, 2, 70, 90, 64, true, false},
      {3, 4, 2, 66, 150, 32, true, true}, {1, 2, 1, 1, 5, 4, false, false},
      {2, 2, 1, 2, 9, 12, true, true},    {2, 12, 2, 3, 70, 64, true, true}, // 6 heads a key: 4 + 2
  };
  for (const Case& c : cases) {
    check_case(c);
  }
  check_swiglu_span();
}

} // namespace check
