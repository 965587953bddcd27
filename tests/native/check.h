// A few helpers for the kernels' native checks (built and run by tests/unit/test_native_kernels.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace check {

struct Count {
  int passed = 0, failed = 0;
};

inline Count& count() {
  static Count c;
  return c;
}

// One check: counted, and printed with its detail when it fails.
inline void expect(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) {
    ++count().passed;
  } else {
    ++count().failed;
    std::printf("FAIL %s %s\n", what.c_str(), detail.c_str());
  }
}

inline std::mt19937& rng() {
  static std::mt19937 r(1234);
  return r;
}

inline float normal(float sd = 1.f) {
  return std::normal_distribution<float>(0.f, sd)(rng());
}

inline int uniform(int lo, int hi) { // [lo, hi]
  return std::uniform_int_distribution<int>(lo, hi)(rng());
}

inline bool same_bits(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

// max |got - ref| / tol[i] (a failure above 1).
inline double worst(const float* got, const std::vector<double>& ref, const std::vector<double>& tol) {
  double w = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(got[i] - ref[i]) / tol[i];
    w = std::isnan(e) ? INFINITY : std::max(w, e);
  }
  return w;
}

// Registered in check_*.cpp, run by main.
void qdot_checks();
void attention_checks();

} // namespace check
