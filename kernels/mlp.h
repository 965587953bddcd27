// The llama-family MLP in one primitive: down(silu(gate(x)) * up(x)) on block-quantized weights.
// A decode step runs 30 of these on SmolLM2; as four ops (three qmm and a SwiGLU) each pays MLX's
// dispatch, a graph node and a pass over memory of its own.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// x [..., K] float32; gate/up [F, K] with bits `gu_bits` (same scale dtype); down [D, F] with
// `down_bits`. Returns [..., D] float32 (CPU stream). `gelu`: gelu_tanh(gate(x)) (gemma's MLP)
// in place of silu.
mx::array mlp(
    const mx::array& x,
    const mx::array& gate_w,
    const mx::array& gate_s,
    const mx::array& gate_b,
    const mx::array& up_w,
    const mx::array& up_s,
    const mx::array& up_b,
    int gu_bits,
    const mx::array& down_w,
    const mx::array& down_s,
    const mx::array& down_b,
    int down_bits,
    bool gelu = false);

// h + mlp(rms_norm(h) * norm_w): a decoder layer's second half (norm, MLP, residual) in one op;
// with `post_norm_w`, h + rms_norm(mlp(...)) * post_norm_w (gemma's post-feedforward norm).
mx::array mlp_residual(
    const mx::array& h,
    const mx::array& norm_w,
    float eps,
    const mx::array& gate_w,
    const mx::array& gate_s,
    const mx::array& gate_b,
    const mx::array& up_w,
    const mx::array& up_s,
    const mx::array& up_b,
    int gu_bits,
    const mx::array& down_w,
    const mx::array& down_s,
    const mx::array& down_b,
    int down_bits,
    bool gelu = false,
    const std::optional<mx::array>& post_norm_w = std::nullopt);

// Inputs x, the three weights' arrays and, for mlp_residual, the norm weight (and the post norm
// weight) last.
class Mlp : public mx::UnaryPrimitive {
 public:
  Mlp(mx::Stream s, int gu_bits, int down_bits, bool gelu, float eps = 0.f)
      : mx::UnaryPrimitive(s), gu_bits_(gu_bits), down_bits_(down_bits), gelu_(gelu), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdMlp";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Mlp&>(other);
    return gu_bits_ == o.gu_bits_ && down_bits_ == o.down_bits_ && gelu_ == o.gelu_ &&
        eps_ == o.eps_;
  }

 private:
  int gu_bits_, down_bits_;
  bool gelu_;
  float eps_;
};

} // namespace mlxd
