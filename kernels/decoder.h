// Decoder layers' decode steps as one primitive on the CPU: per layer attn_in (RMSNorm, q/k/v
// projections, qwen2's biases, qwen3's q/k norms, RoPE), the KV cache's write, attention,
// o_proj with the residual add, and the MLP with its norm and residual add; for one layer or
// for a model's whole stack of them. As five ops a layer (attn_in, kv_update, decode_attention,
// qmm_add, mlp_residual) a SmolLM2 step was 150 graph nodes and as many kernel calls from
// Python, each with its arguments; this runs the same computations (parts.h), so it gives their
// bits, from one node and one call.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "parts.h"

namespace mlxd {

namespace mx = mlx::core;

// A layer's weights (evaluated, row-contiguous: MLX arrays never change, so the plan reads them
// as graph inputs would be read) and settings, checked once. The op holds the plan while it
// runs; its graph nodes carry only what changes from step to step.
// enable_shared_from_this: the plans a step's op holds then share C++ ownership with the Python
// objects. Without it nanobind hands C++ a shared_ptr whose deleter takes the GIL, and MLX's
// stream thread dropped the op's plans one GIL acquisition each (waiting up to the switch
// interval behind any Python thread every time, and deadlocking with a thread that holds the GIL
// while it synchronizes the streams, as mx.clear_cache() does).
struct LayerPlan : std::enable_shared_from_this<LayerPlan> {
  std::vector<mx::array> arrays; // the 23 weight arrays, then the q/k norm weights and biases
  QWeight W[7]; // q, k, v, o, gate, up, down
  const float *n1, *n2, *qn, *kn, *bias[3];
  float eps1, eps2, attn_scale;
  RopeArgs rope;
  int K, Hq, Hk, D, Dv;
};

// weights, 23 arrays: the input norm's weight [K] float32; q, k, v, o (weight, scales, biases
// each, group 32); the post-attention norm's weight [K]; gate, up, down. bits: q/k/v's, o's,
// gate/up's, down's. eps: the two norms'. rope: as attn_in's (dims, traditional, base, scale);
// attn_scale the attention's. q_norm_w, k_norm_w, q_bias, k_bias, v_bias: as attn_in's.
std::shared_ptr<LayerPlan> layer_plan(
    const std::vector<mx::array>& weights,
    const std::vector<int>& bits,
    float eps1,
    float eps2,
    int n_heads,
    int dims,
    bool traditional,
    float base,
    float rope_scale,
    float attn_scale,
    const std::optional<mx::array>& q_norm_w = std::nullopt,
    const std::optional<mx::array>& k_norm_w = std::nullopt,
    const std::optional<mx::array>& q_bias = std::nullopt,
    const std::optional<mx::array>& k_bias = std::nullopt,
    const std::optional<mx::array>& v_bias = std::nullopt);

// The layers of `plans` in turn from x [B, T, K] float32: T query positions a row (a decode
// step's one, or a verify pass's token and drafts), each computed as a one-position step there
// computes it. keys[i] [B, Hk, C, D] and values[i] [B, Hk, C, Dv]: layer i's cache's float32
// buffers (one C for all); offset int32 [B] the rows' positions and idx (idx + T <= C) the first
// position written (one batch: every layer's cache holds the same positions). mask: bool
// [B or 1, 1, T, idx + T] (false: a key not attended) or none. Returns [y [B, T, K], offset + T,
// then per layer its keys and values with the new k, v at positions idx .. idx + T - 1]; a buffer
// is written in place when MLX may donate it (as kv_update does), else copied.
std::vector<mx::array> decoder_stack(
    const std::vector<std::shared_ptr<LayerPlan>>& plans,
    const mx::array& x,
    const std::vector<mx::array>& keys,
    const std::vector<mx::array>& values,
    const mx::array& offset,
    int idx,
    const std::optional<mx::array>& mask);

class DecoderStack : public mx::Primitive {
 public:
  DecoderStack(mx::Stream s, std::vector<std::shared_ptr<LayerPlan>> plans, int idx, bool mask)
      : mx::Primitive(s), plans_(std::move(plans)), idx_(idx), mask_(mask) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxdDecoderStack";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecoderStack&>(other);
    return plans_ == o.plans_ && idx_ == o.idx_ && mask_ == o.mask_;
  }

 private:
  std::vector<std::shared_ptr<LayerPlan>> plans_;
  int idx_;
  bool mask_;
};

} // namespace mlxd
