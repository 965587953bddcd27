// One op that draws a token per row from logits (temperature, top-k, min-p, top-p, then an
// inverse-CDF draw against the row's own uniform): the sampler's ~15-30 MLX ops over the whole
// vocabulary (each a pass, MLX's CPU exp ~23 ns an element) become three passes in one op.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// Parameters of one row, in the order of `params`' columns.
enum SampleParam { kTemperature = 0, kTopK, kTopP, kMinP, kNumSampleParams };

// logits [B, V] float32, params [B, 4] float32 (temperature > 0; top_k, 0 or >= V: off; top_p,
// 1: off; min_p, 0: off), u [B] float32 in [0, 1): int32 [B] token ids (see sample.cpp).
mx::array sample_tokens(const mx::array& logits, const mx::array& params, const mx::array& u);

class SampleTokens : public mx::UnaryPrimitive {
 public:
  explicit SampleTokens(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdSampleTokens";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace mlxd
