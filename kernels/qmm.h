// Block-quantized matmul for MLX's CPU backend: y = x @ dequantize(w)^T on MLX affine group-32
// arrays (4 or 8 bits), the layout mlxd keeps GGUF's Q4_0 / Q4_1 / Q8_0 tensors in.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "qdot.h"

namespace mlxd {

namespace mx = mlx::core;

// x [..., K] float32; w uint32 [N, K * bits / 32]; scales, biases [N, K / 32] (f16, bf16 or f32).
// Returns [..., N] float32. Runs on the CPU stream only.
mx::array qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits);

// residual + qmm(x, w, scales, biases, bits), residual of the result's shape: a projection and the
// residual add after it as one op. With `norm_w` [N] float32, residual + rms_norm(qmm(...), norm_w,
// eps) (gemma's post-attention norm).
mx::array qmm_add(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    const mx::array& residual,
    const std::optional<mx::array>& norm_w = std::nullopt,
    float eps = 0.f);

// dequantize(w, scales, biases) in float32 [N, K] (same layouts as qmm).
mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits);

// Checks one quantized weight's arrays (raising std::invalid_argument in `what`'s name); returns K.
int check_weight(
    const char* what,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits);

// The kernels' view of a checked weight (data pointers left null: they are set at eval time).
QWeight weight_of(const mx::array& w, const mx::array& scales, int bits);

// The worker-thread count.
int num_threads();
void set_num_threads(int n);
// Makes CPU stream `s`'s thread a background one (its next task does it): its kernel calls run
// on it alone, and on Linux the OS runs it only where no other thread wants the core.
void background_stream(mx::Stream s);

class QMatmul : public mx::UnaryPrimitive {
 public:
  QMatmul(mx::Stream stream, int bits, float eps = 0.f)
      : mx::UnaryPrimitive(stream), bits_(bits), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdQMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QMatmul&>(other);
    return bits_ == o.bits_ && eps_ == o.eps_;
  }

 private:
  int bits_;
  float eps_;
};

} // namespace mlxd
