// The kernels' MLX primitives on Linux arm64, through MLX's own graph evaluation (the aarch64 mlx
// wheel's libmlx), against MLX's reference ops: quantized matmul (4 and 8 bits, 1 to 17 rows,
// K with blocks past a full SDOT pass), decode attention over a left-padded batch, SwiGLU.
// Built and run under qemu-user by scripts/arm64_check.py (`make kernels-arm64`).
#include <algorithm>
#include <cstdio>

#include "attention.h"
#include "fused.h"
#include "qdot.h"
#include "qmm.h"

#include "mlx/mlx.h"

namespace mx = mlx::core;

namespace {

int failed = 0, passed = 0;

void report(const char* what, const mx::array& got, const mx::array& ref, float tol) {
  const float scale = std::max(1e-6f, mx::max(mx::abs(ref)).item<float>());
  const float err = mx::max(mx::abs(got - ref)).item<float>() / scale;
  const bool ok = err <= tol; // NaN fails
  std::printf("%s %s: max error / max |ref| %.3g\n", ok ? "ok  " : "FAIL", what, err);
  (ok ? passed : failed) += 1;
}

} // namespace

int main() {
  mx::set_default_device(mx::Device::cpu);
  std::printf("simd: %s\n", mlxd::simd_path());
  mx::random::seed(3);
  for (int bits : {4, 8}) {
    for (int M : {1, 5, 17}) {
      const auto w = mx::random::normal({200, 576}) * 0.1;
      const auto x = mx::random::normal({M, 576});
      const auto q = mx::quantize(w, 32, bits);
      const auto s = mx::astype(q[1], mx::float16), b = mx::astype(q[2], mx::float16);
      const auto dense = mx::dequantize(
          q[0], mx::astype(s, mx::float32), mx::astype(b, mx::float32), 32, bits);
      char name[64];
      std::snprintf(name, sizeof name, "qmm bits=%d rows=%d", bits, M);
      // int8 activations (SDOT builds) round x to ~15 bits per block.
      report(name, mlxd::qmm(x, q[0], s, b, bits), mx::matmul(x, mx::transpose(dense)), 1e-3);
    }
  }
  const auto q = mx::random::normal({3, 6, 1, 64});
  const auto k = mx::random::normal({3, 2, 77, 64}), v = mx::random::normal({3, 2, 77, 64});
  const auto pad = mx::reshape(mx::array({0, 5, 30}), {3, 1, 1, 1});
  const auto mask = mx::greater_equal(mx::reshape(mx::arange(77), {1, 1, 1, 77}), pad);
  report(
      "decode_attention",
      mlxd::decode_attention(q, k, v, mask, 0.125f),
      mx::fast::scaled_dot_product_attention(q, k, v, 0.125f, "", mask),
      1e-4);
  const auto g = mx::random::normal({4, 1000}) * 4, u = mx::random::normal({4, 1000});
  report("swiglu", mlxd::swiglu(g, u), g * mx::sigmoid(g) * u, 1e-5);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed != 0 || passed == 0;
}
