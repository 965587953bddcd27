// Fused elementwise kernels on the CPU: MLX's CPU rope and rms_norm run as several ops each
// (~50-130 us for a decode row), and its SiLU on a slow exp (23 ns an element); these are one pass.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// x [..., D] float32, w [D] float32: x * rsqrt(mean(x^2) + eps) * w.
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps);

// x [B, H, L, D] float32; offset int32 [B] (or [1]): MLX's fast.rope semantics (dims features
// rotated, positions (offset + l) * scale, frequencies base^(-2i/dims)).
mx::array rope(
    const mx::array& x,
    const mx::array& offset,
    int dims,
    bool traditional,
    float base,
    float scale);

// g, u float32 of one shape: silu(g) * u with the vectorized exp (a prefill's SwiGLU between
// its BLAS projections).
mx::array swiglu(const mx::array& g, const mx::array& u);

class SwiGlu : public mx::UnaryPrimitive {
 public:
  explicit SwiGlu(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdSwiGlu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : mx::UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdRmsNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream s, int dims, bool traditional, float base, float scale)
      : mx::UnaryPrimitive(s),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
        scale_ == o.scale_;
  }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
};

} // namespace mlxd
