#include "sample.h"
#include "packed.h"
#include "vexp.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <queue>
#include <stdexcept>
#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// top_p bins tokens by logit below the row's largest (kBinsPerUnit bins a unit, kBins bins;
// the last also takes everything further down, weights under e^-32 of the largest).
constexpr int kBinsPerUnit = 4;
constexpr int kBins = 32 * kBinsPerUnit;

// The k largest of x[0..n) that are > -inf, in descending order (fewer if fewer are finite).
std::vector<float> largest(const float* x, int n, int k) {
  std::priority_queue<float, std::vector<float>, std::greater<float>> heap; // min on top
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    if (static_cast<int>(heap.size()) < k) {
      if (v > kNegInf) {
        heap.push(v);
      }
    } else if (v > heap.top()) {
      heap.pop();
      heap.push(v);
    }
  }
  std::vector<float> out(heap.size());
  for (size_t i = out.size(); i-- > 0;) {
    out[i] = heap.top();
    heap.pop();
  }
  return out;
}

// The value of the last token kept by top_p, walking `desc` (x values, descending, from `from`
// on) with `cum` the mass before them: tokens are kept while the mass before them is below
// `need` (the first always stays). -inf when the walk runs out (keep everything).
float walk(const std::vector<float>& desc, float floor, float top, float need, float cum) {
  float cut = kNegInf;
  for (float v : desc) {
    if (v < floor || (cut > kNegInf && cum >= need)) {
      return cut;
    }
    cum += vexp::exp1(v - top);
    cut = v;
  }
  return cum >= need ? cut : kNegInf;
}

// top_p over top_k's candidates (descending).
float walk_cut(const std::vector<float>& best, float floor, float top, float need) {
  return walk(best, floor, top, need, 0.f);
}

// top_p over the whole row without sorting it: the weights w = exp(x - top) are summed in bins
// of x, the bin where the running mass (from the top) reaches `need` is the only one sorted.
float nucleus_cut(const float* x, const float* w, int V, float top, float need) {
  auto bin = [top](float v) {
    const float d = (top - v) * kBinsPerUnit;
    return d < kBins - 1 ? static_cast<int>(d) : kBins - 1;
  };
  float mass[kBins] = {};
  for (int i = 0; i < V; ++i) {
    if (w[i] > 0.f) {
      mass[bin(x[i])] += w[i];
    }
  }
  float cum = 0.f;
  int b = 0;
  for (; b < kBins - 1 && cum + mass[b] < need; ++b) {
    cum += mass[b];
  }
  if (b == kBins - 1) {
    return kNegInf; // the cut is among weights too small to tell apart: keep everything
  }
  std::vector<float> vals;
  for (int i = 0; i < V; ++i) {
    if (w[i] > 0.f && bin(x[i]) == b) {
      vals.push_back(x[i]);
    }
  }
  if (vals.empty()) {
    return kNegInf; // NaN weights: no bin holds the cut
  }
  std::sort(vals.begin(), vals.end(), std::greater<float>());
  const float cut = walk(vals, kNegInf, top, need, cum);
  return cut > kNegInf ? cut : vals.back();
}

// Sum of w[0..n) in 8 interleaved partial sums (a dependency chain of one add per element
// would run ~4x slower).
float sum8(const float* w, int n) {
  float acc[8] = {};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      acc[j] += w[i + j];
    }
  }
  for (; i < n; ++i) {
    acc[0] += w[i];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The first index where the running sum of the weights w passes u * (their sum): an
// inverse-CDF draw. Blocks whose sum stays below the target are skipped whole.
int draw(const float* w, int V, float u) {
  constexpr int kBlock = 256;
  const float target = u * sum8(w, V);
  float cum = 0.f;
  int last = -1;
  for (int b = 0; b < V; b += kBlock) {
    const int n = std::min(kBlock, V - b);
    const float s = sum8(w + b, n);
    if (cum + s <= target) {
      cum += s;
      for (int i = n; i-- > 0;) {
        if (w[b + i] > 0.f) {
          last = b + i;
          break;
        }
      }
      continue;
    }
    for (int i = 0; i < n; ++i) {
      if (w[b + i] > 0.f) {
        cum += w[b + i];
        last = b + i;
        if (cum > target) {
          return last;
        }
      }
    }
  }
  return std::max(last, 0); // rounding: the target reached the sum
}

// One row: x holds the logits divided by the temperature (scratch, overwritten); w is scratch
// of the same size. Returns the drawn id.
int sample_row(float* x, float* w, int V, const float* p, float u) {
  const int top_k = static_cast<int>(p[kTopK]);
  const float top_p = p[kTopP], min_p = p[kMinP];
  float top = kNegInf;
  for (int i = 0; i < V; ++i) {
    top = x[i] > top ? x[i] : top;
  }
  if (!(top > kNegInf)) {
    return 0; // nothing finite to draw from (a NaN row, or every token masked)
  }
  if (top == -kNegInf) {
    // An infinite logit (or one a tiny temperature scaled past float's range) takes all the
    // mass; the weights exp(x - top) below would be NaN.
    return static_cast<int>(std::find(x, x + V, top) - x);
  }
  float floor = kNegInf; // tokens below it are out
  std::vector<float> best; // top_k's candidates, descending
  if (top_k > 0 && top_k < V) {
    best = largest(x, V, top_k);
    floor = best.back(); // the k-th largest: ties with it stay, as in the MLX path
  }
  if (min_p > 0.f) { // p < min_p * p_max  <=>  x < x_max + log(min_p)
    floor = std::max(floor, top + std::log(min_p));
  }
  if (floor > kNegInf) {
    for (int i = 0; i < V; ++i) {
      x[i] = x[i] >= floor ? x[i] : kNegInf;
    }
  }
  std::copy(x, x + V, w);
  const float total = vexp::exp_shifted_sum(w, V, top); // w: the weights exp(x - top)
  if (top_p < 1.f) {
    const float cut = best.empty() ? nucleus_cut(x, w, V, top, top_p * total)
                                   : walk_cut(best, floor, top, top_p * total);
    if (cut > kNegInf) {
      for (int i = 0; i < V; ++i) {
        w[i] = x[i] >= cut ? w[i] : 0.f;
      }
    }
  }
  return draw(w, V, u);
}

} // namespace

mx::array sample_tokens(const mx::array& logits, const mx::array& params, const mx::array& u) {
  if (logits.dtype() != mx::float32 || logits.ndim() != 2 || params.dtype() != mx::float32 ||
      params.ndim() != 2 || params.shape(0) != logits.shape(0) ||
      params.shape(1) != kNumSampleParams || u.dtype() != mx::float32 || u.ndim() != 1 ||
      u.shape(0) != logits.shape(0)) {
    throw std::invalid_argument(
        "sample_tokens: float32 logits [B, V], params [B, 4] and u [B]");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(
      {logits.shape(0)}, mx::int32, std::make_shared<SampleTokens>(s), {logits, params, u});
}

void SampleTokens::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    enc.set_input_array(in);
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  int* y = out.data<int>();
  enc.dispatch([ins = weak_copies(inputs), y]() {
    std::vector<std::vector<char>> tmp(ins.size());
    const auto ptr = row_major(ins, tmp);
    const auto* logits = static_cast<const float*>(ptr[0]);
    const auto* params = static_cast<const float*>(ptr[1]);
    const auto* u = static_cast<const float*>(ptr[2]);
    const int B = ins[0].shape(0), V = ins[0].shape(1);
    std::vector<float> x(V), w(V);
    for (int b = 0; b < B; ++b) {
      const float* row = logits + static_cast<size_t>(b) * V;
      const float* p = params + b * kNumSampleParams;
      const float inv_t = 1.f / p[kTemperature];
      for (int i = 0; i < V; ++i) {
        x[i] = row[i] * inv_t;
      }
      y[b] = sample_row(x.data(), w.data(), V, p, u[b]);
    }
  });
}

void SampleTokens::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdSampleTokens runs on the CPU only");
}

} // namespace mlxd
