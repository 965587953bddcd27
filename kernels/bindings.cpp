// Python bindings: mlxd's CPU kernels as the `models._kernels` module.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/vector.h>

#include "attention.h"
#include "decoder.h"
#include "embed.h"
#include "fused.h"
#include "kv_cache.h"
#include "layer.h"
#include "mlp.h"
#include "qmm.h"
#include "quantize.h"
#include "sample.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_kernels, m) {
  m.doc() =
      "mlxd CPU kernels for MLX (block-quantized matmul and MLP, RMSNorm, RoPE, attention)";
  m.def(
      "qmm",
      &mlxd::qmm,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "bits"_a,
      "y = x @ dequantize(w, scales, biases, group_size=32, bits)^T in float32, on the CPU.");
  m.def(
      "qmm_add",
      &mlxd::qmm_add,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "bits"_a,
      "residual"_a,
      "norm_w"_a = nb::none(),
      "eps"_a = 0.f,
      "residual + qmm(x, w, scales, biases, bits) in one op (float32, CPU); with norm_w, the"
      " product RMS-normed before the add.");
  m.def(
      "dequantize",
      &mlxd::dequantize,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "bits"_a,
      "dequantize(w, scales, biases, group_size=32, bits) in float32, on the CPU.");
  m.def(
      "mlp",
      &mlxd::mlp,
      "x"_a,
      "gate_w"_a,
      "gate_s"_a,
      "gate_b"_a,
      "up_w"_a,
      "up_s"_a,
      "up_b"_a,
      "gu_bits"_a,
      "down_w"_a,
      "down_s"_a,
      "down_b"_a,
      "down_bits"_a,
      "gelu"_a = false,
      "down(silu(gate(x)) * up(x)) on group-32 quantized weights in one op (float32, CPU); gelu:"
      " gelu_tanh in place of silu.");
  m.def(
      "mlp_residual",
      &mlxd::mlp_residual,
      "h"_a,
      "norm_w"_a,
      "eps"_a,
      "gate_w"_a,
      "gate_s"_a,
      "gate_b"_a,
      "up_w"_a,
      "up_s"_a,
      "up_b"_a,
      "gu_bits"_a,
      "down_w"_a,
      "down_s"_a,
      "down_b"_a,
      "down_bits"_a,
      "gelu"_a = false,
      "post_norm_w"_a = nb::none(),
      "h + mlp(rms_norm(h, norm_w, eps)) in one op (float32, CPU); with post_norm_w, the MLP's"
      " output RMS-normed (same eps) before the add.");
  m.def(
      "attn_in",
      &mlxd::attn_in,
      "x"_a,
      "norm_w"_a,
      "eps"_a,
      "q_w"_a,
      "q_s"_a,
      "q_b"_a,
      "k_w"_a,
      "k_s"_a,
      "k_b"_a,
      "v_w"_a,
      "v_s"_a,
      "v_b"_a,
      "bits"_a,
      "offset"_a,
      "n_heads"_a,
      "n_kv_heads"_a,
      "dims"_a,
      "traditional"_a,
      "base"_a,
      "scale"_a,
      "q_norm_w"_a = nb::none(),
      "k_norm_w"_a = nb::none(),
      "q_bias"_a = nb::none(),
      "k_bias"_a = nb::none(),
      "v_bias"_a = nb::none(),
      "[q, k, v] of a decode step: RMSNorm, the three projections (optional biases), optional"
      " per-head q/k RMSNorms and RoPE on q and k in one op (float32 x [B, 1, K];"
      " q [B, Hq, 1, D], k [B, Hk, 1, D], v [B, Hk, 1, Dv]; CPU).");
  m.def(
      "swiglu",
      static_cast<mlxd::mx::array (*)(const mlxd::mx::array&, const mlxd::mx::array&)>(
          &mlxd::swiglu),
      "g"_a,
      "u"_a,
      "silu(g) * u with the vectorized exp (float32, one shape, CPU).");
  m.def(
      "rms_norm",
      &mlxd::rms_norm,
      "x"_a,
      "w"_a,
      "eps"_a,
      "x * rsqrt(mean(x^2, -1) + eps) * w in one pass (float32, CPU).");
  m.def(
      "rope",
      &mlxd::rope,
      "x"_a,
      "offset"_a,
      "dims"_a,
      "traditional"_a,
      "base"_a,
      "scale"_a,
      "mx.fast.rope in one pass (float32 x [B, H, L, D], int32 offset [B] or [1], CPU).");
  m.def(
      "decode_attention",
      &mlxd::decode_attention,
      "q"_a,
      "k"_a,
      "v"_a,
      "mask"_a.none(),
      "scale"_a,
      "causal"_a = false,
      "flat"_a = false,
      "softmax(scale * q k^T) v (float32 q [B, Hq, L, D], k/v [B, Hk, T, D], mask bool"
      " [B or 1, 1, L or 1, T] or None; causal: position l also sees keys t <= T - L + l only),"
      " on the CPU; flat (L == 1): the output as [B, 1, Hq * Dv].");
  m.def(
      "sample_tokens",
      &mlxd::sample_tokens,
      "logits"_a,
      "params"_a,
      "u"_a,
      "One token per row of float32 logits [B, V]: params [B, 4] (temperature, top_k, top_p,"
      " min_p) filter, then an inverse-CDF draw at the row's uniform u [B] (CPU).");
  m.def(
      "embed_rows",
      &mlxd::embed_rows,
      "ids"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "bits"_a,
      "float32 [*ids.shape, K]: dequantize(w[ids], scales[ids], biases[ids]) (group size 32, 4 or"
      " 8 bits) in one op, rounded as MLX's dequantize rounds (CPU).");
  m.def(
      "kv_update",
      &mlxd::kv_update,
      "keys"_a,
      "values"_a,
      "offset"_a,
      "k"_a,
      "v"_a,
      "idx"_a,
      "A batch KV cache's update in one op: [keys and values with k, v written at positions"
      " [idx, idx + L), offset + L, views of their first idx + L positions] (CPU).");
  nb::class_<mlxd::LayerPlan>(m, "LayerPlan", "A decoder layer's checked weights and settings.");
  m.def(
      "layer_plan",
      &mlxd::layer_plan,
      "weights"_a,
      "bits"_a,
      "eps1"_a,
      "eps2"_a,
      "n_heads"_a,
      "dims"_a,
      "traditional"_a,
      "base"_a,
      "rope_scale"_a,
      "attn_scale"_a,
      "q_norm_w"_a = nb::none(),
      "k_norm_w"_a = nb::none(),
      "q_bias"_a = nb::none(),
      "k_bias"_a = nb::none(),
      "v_bias"_a = nb::none(),
      "A decoder layer's weights and settings for decoder_layer, checked once (see"
      " kernels/decoder.h).");
  m.def(
      "decoder_stack",
      &mlxd::decoder_stack,
      "plans"_a,
      "x"_a,
      "keys"_a,
      "values"_a,
      "offset"_a,
      "idx"_a,
      "mask"_a.none(),
      "Decoder layers' step over T positions a row in one op: [y, offset + T, then each layer's"
      " keys and values with the new k, v written from idx] (CPU; see kernels/decoder.h).");
  m.def(
      "quantize8",
      &mlxd::quantize8,
      "w"_a,
      "[uint32 [..., K / 4], float32 scales, float32 biases [..., K / 32]]: mx.quantize("
      "w.astype(float32), group_size=32, bits=8), bit for bit, in one multithreaded pass (CPU).");
  m.def("simd_path", &mlxd::simd_path, "The SIMD code path compiled in.");
  m.def("num_threads", &mlxd::num_threads, "Threads a matmul splits its rows over.");
  m.def("set_num_threads", &mlxd::set_num_threads, "n"_a, "Resize the kernels' thread pool.");
  m.def(
      "background_stream",
      &mlxd::background_stream,
      "stream"_a,
      "Run CPU stream `stream`'s thread in the background: its kernel calls never take the pool's"
      " workers, and on Linux it gets only the cores no other thread wants.");
}
