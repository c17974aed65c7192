// Decode attention over each row's own cached length: lorakit::decode_attention.
//
// One query token per row; the query heads that share a KV head (grouped-query attention) read that head's keys and
// values once. Row i attends over positions [0, lengths[i]) of slot slots[i] of the cache, so no position past a
// row's length is read (no padding to the batch's longest row, no mask), and a row's result is computed by the same
// instructions in the same order whatever else is in the batch: bit for bit the same alone and in any batch.
// Scores and the softmax are fp32; keys, values and queries may be float or bfloat16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec16.h"

namespace {

using namespace lorakit_vec;

// e^x for x <= 0 (a score minus the row's largest), 16 at a time, as Cephes' expf: x = n·ln2 + r, e^r by a degree-6
// polynomial, 2^n through the exponent bits (libm's expf is a scalar call); within 2 ulp of expf; below -87 it
// gives ~1e-38 where expf gives a subnormal or 0.
inline f16v exp16(f16v x) {
  typedef int32_t i16v __attribute__((vector_size(64)));
  x = x < -87.f ? f16v{} - 87.f : x;
  f16v n = x * 1.44269504088896341f + 0.5f;
  i16v ni = __builtin_convertvector(n, i16v);  // truncates toward zero: floor for n >= 0, fixed below otherwise
  ni = ni - (__builtin_convertvector(ni, f16v) > n ? 1 : 0);
  n = __builtin_convertvector(ni, f16v);
  const f16v r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f16v p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * reinterpret_cast<f16v>((ni + 127) << 23);
}

// One (row, KV head): `groups` query heads over `length` cached positions, 16 lanes of the head at a time.
template <typename T>
void attend_one(const T* q, const T* keys, const T* values, T* out, int64_t groups, int64_t dim, int64_t length,
                float scale, std::vector<float>& buf) {
  const int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
  buf.resize(groups * dim + groups * padded);  // queries | scores (each group's row padded to whole vectors)
  float* qf = buf.data();
  float* scores = qf + groups * dim;
  for (int64_t i = 0; i < groups * dim; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  for (int64_t g = 0; g < groups; ++g) {  // 16 positions at a time: 16 independent dot products, summed as a tree
    const float* qg = qf + g * dim;
    float* sg = scores + g * padded;
    int64_t t = 0;
    for (; t + kLanes <= length; t += kLanes) {
      const T* k = keys + t * dim;
      f16v s[kLanes] = {};
      for (int64_t j = 0; j < dim; j += kLanes) {
        const f16v qj = load16(qg + j);
        for (int64_t u = 0; u < kLanes; ++u) s[u] += qj * load16(k + u * dim + j);
      }
      const f16v sums = sum16x16(s);
      std::memcpy(sg + t, &sums, sizeof sums);
    }
    for (; t < length; ++t) {
      f16v s0 = {};
      for (int64_t j = 0; j < dim; j += kLanes) s0 += load16(qg + j) * load16(keys + t * dim + j);
      sg[t] = sum16(s0);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* sg = scores + g * padded;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t) top = sg[t] > top ? sg[t] : top;
    const f16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    f16v total = {};
    for (int64_t t = 0; t < padded; t += kLanes) {  // lanes past the row's length (unset scores) count as zero
      f16v e = exp16(load16(sg + t) - top);
      e = lane + static_cast<float>(t) < static_cast<float>(length) ? e : f16v{};
      std::memcpy(sg + t, &e, sizeof e);
      total += e;
    }
    const float inv = 1.f / sum16(total);
    for (int64_t t = 0; t < length; ++t) sg[t] *= inv;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const float* pg = scores + g * padded;
    for (int64_t j = 0; j < dim; j += kLanes) {
      f16v a0 = {}, a1 = {}, a2 = {}, a3 = {};  // four positions at a time: four independent chains
      int64_t t = 0;
      for (; t + 4 <= length; t += 4) {
        const T* v = values + t * dim + j;
        a0 += pg[t] * load16(v);
        a1 += pg[t + 1] * load16(v + dim);
        a2 += pg[t + 2] * load16(v + 2 * dim);
        a3 += pg[t + 3] * load16(v + 3 * dim);
      }
      for (; t < length; ++t) a0 += pg[t] * load16(values + t * dim + j);
      const f16v acc = (a0 + a1) + (a2 + a3);
      for (int64_t l = 0; l < kLanes; ++l) out[g * dim + j + l] = static_cast<T>(acc[l]);
    }
  }
}

template <typename T>
void run_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, at::Tensor& out,
              const int64_t* slots, const int64_t* lengths, float scale) {
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), D = q.size(3), C = keys.size(2);
  const T* qd = q.data_ptr<T>();
  const T* kd = keys.data_ptr<T>();
  const T* vd = values.data_ptr<T>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / KV, h = task % KV;
      const int64_t at = (slots[i] * KV + h) * C * D;
      attend_one<T>(qd + task * G * D, kd + at, vd + at, od + task * G * D, G, D, lengths[i], scale, buf);
    }
  });
}

// q: (B, KV, G, D); keys, values: (S, KV, C, D); slots, lengths: (B,) int64. Returns (B, KV, G, D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(),
              "decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "decode_attention: q (B, KV, G, D) and caches (S, KV, C, D) expected, got ", q.sizes(), " and ",
              keys.sizes());
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(),
              "decode_attention: q, keys and values must share a dtype");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "decode_attention: caches must be contiguous");
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), D = q.size(3), S = keys.size(0), C = keys.size(2);
  TORCH_CHECK(keys.size(1) == KV && keys.size(3) == D, "decode_attention: q and cache heads/dims differ");
  TORCH_CHECK(D % kLanes == 0, "decode_attention: head size ", D, " is not a multiple of ", kLanes);
  TORCH_CHECK(slots.numel() == B && lengths.numel() == B, "decode_attention: one slot and one length per row");
  at::Tensor qc = q.contiguous();
  at::Tensor slot = slots.to(at::kLong).contiguous(), len = lengths.to(at::kLong).contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "decode_attention: slot ", sp[i], " outside the cache's ", S, " slots");
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= C, "decode_attention: length ", lp[i], " outside 1..", C);
  }
  at::Tensor out = at::empty_like(qc);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: float32 or bfloat16 expected, got ", q.scalar_type());
  if (q.scalar_type() == at::kFloat) {
    run_rows<float>(qc, keys, values, out, sp, lp, static_cast<float>(scale));
  } else {
    run_rows<c10::BFloat16>(qc, keys, values, out, sp, lp, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) { m.impl("decode_attention", &decode_attention); }
