// A few rows times frozen fp32 weights: lorakit::linear_rows(x (M, in), [W_1 (out_1, in), ...]) -> (M, Σ out_i), the
// outputs of linears that read the same input side by side (q|k|v, gate|up) without concatenating their weights.
//
// A decode step of one row is a matrix-vector product per linear, bound by how fast the weights stream from memory.
// oneDNN's packed fp32 kernel streamed SmolLM2-135M's weights at ~21 GB/s for one row on a 2-core EPYC; this kernel
// streams each weight once, 16 output rows at a time (16 independent dot products summed as one shuffle tree).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "vec16.h"

namespace {

using namespace lorakit_vec;

// out[m, o0 .. o0+n) = x[m] · W[o0 .. o0+n) for n <= 16 rows of one weight.
void rows_block(const float* x, int64_t rows, int64_t in, const float* w, int64_t n, float* out, int64_t out_stride) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * in;
    f16v acc[kLanes] = {};
    for (int64_t j = 0; j < in; j += kLanes) {
      const f16v xj = load16(xm + j);
      for (int64_t u = 0; u < n; ++u) acc[u] += load16(w + u * in + j) * xj;
    }
    if (n == kLanes) {
      const f16v sums = sum16x16(acc);
      std::memcpy(out + m * out_stride, &sums, sizeof sums);
    } else {
      for (int64_t u = 0; u < n; ++u) out[m * out_stride + u] = sum16(acc[u]);
    }
  }
}

at::Tensor linear_rows(const at::Tensor& x, at::TensorList weights) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "linear_rows: x must be a float32 CPU matrix (rows, in), got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(!weights.empty(), "linear_rows: no weights");
  const int64_t rows = x.size(0), in = x.size(1);
  TORCH_CHECK(in % kLanes == 0, "linear_rows: the input width ", in, " is not a multiple of ", kLanes);
  std::vector<int64_t> first{0};  // each weight's first output column
  for (const auto& w : weights) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(1) == in &&
                    w.is_contiguous(),
                "linear_rows: weights must be contiguous float32 CPU matrices (out, ", in, "), got ", w.scalar_type(),
                " ", w.sizes());
    first.push_back(first.back() + w.size(0));
  }
  const int64_t total = first.back();
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({rows, total}, x.options());
  const float* xd = xc.data_ptr<float>();
  float* od = out.data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (weight, first row) of every 16-row block
  for (size_t i = 0; i < weights.size(); ++i)
    for (int64_t o = 0; o < weights[i].size(0); o += kLanes) blocks.emplace_back(i, o);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto [i, o] = blocks[b];
      const at::Tensor& w = weights[i];
      rows_block(xd, rows, in, w.data_ptr<float>() + o * in, std::min(kLanes, w.size(0) - o), od + first[i] + o,
                 total);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit, m) { m.def("linear_rows(Tensor x, Tensor[] weights) -> Tensor"); }

TORCH_LIBRARY_IMPL(lorakit, CPU, m) { m.impl("linear_rows", &linear_rows); }
