// The serving engine's small per-layer ops, each one call instead of several torch ops (``serve/runner.py``).
//
// A decode step of a small model is dominated by per-op dispatch, not by arithmetic: every torch op costs
// microseconds whatever its size, and a Llama layer runs dozens of them. These fuse the ones around the
// matmuls, with the same roundings as the torch code they replace (``serve/runner.py``):
//   - rms_norm: transformers' LlamaRMSNorm (float32 statistics, normalised value rounded to the input dtype,
//     then times the weight in that dtype), optionally after the residual add ``h + delta`` (rounded);
//   - silu_mul: the Llama MLP's ``silu(gate) * up``, the silu rounded before the product;
//   - rope: ``x*cos + roll(x, hd/2)*signed_sin`` in place on q and k, each product and the sum rounded;
//   - paged_decode_attention: one query token per sequence attending to its keys in the paged KV cache,
//     read through its block table (no gather), with grouped-query heads and an optional sliding window;
//   - kv_write: the step's new K/V stored at their slots;
//   - decode_attention_step: a decode-only step's RoPE, KV write and attention of one layer in one call.
// Accumulation is float32 throughout; the outputs are rounded once to the tensors' dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T narrow(float x) { return static_cast<T>(x); }

// ``n`` values of ``src`` as float32 into ``dst``; bf16 by its bits (the upper half of a float32), which vectorizes
inline void widen_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void widen_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define AVX512_PATH 1
#define AVX512 __attribute__((target("avx512f")))
// torch's own vectorized exp, exported by libtorch_cpu: the exp that torch's CPU kernels (F.silu among them) use on
// AVX512, so our silu rounds as theirs does
extern "C" __m512 Sleef_expf16_u10avx512f(__m512);

const bool kAvx512 = __builtin_cpu_supports("avx512f");

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// ``x`` rounded to bf16 and widened back: c10::BFloat16's round to nearest even, NaN kept a quiet NaN
AVX512 inline __m512 round_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                           _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_ps(NAN));
}

template <typename T>
AVX512 inline __m512 round_to(__m512 x) { return std::is_same<T, float>::value ? x : round_bf16(x); }

AVX512 inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
AVX512 inline void store16(c10::BFloat16* p, __m512 x) {  // ``x`` already rounded to bf16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16)));
}

// silu(gate)·up over the first multiple of 16 of ``n`` (returned); the silu rounded to T before the product
template <typename T>
AVX512 int64_t silu_mul_avx512(const T* gate, const T* up, T* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = load16(gate + i);
    const __m512 silu = round_to<T>(_mm512_div_ps(g, _mm512_add_ps(one, Sleef_expf16_u10avx512f(
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign))))));
    store16(out + i, round_to<T>(_mm512_mul_ps(silu, load16(up + i))));
  }
  return i;
}

// ``x[j] = exp(x[j] − top)`` for the first multiple of 16 of ``n`` (returned), each rounded to bf16 if asked; adds
// the unrounded exps to ``total``
AVX512 int64_t exp_shifted_avx512(float* x, int64_t n, float top, bool bf16, float& total) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = Sleef_expf16_u10avx512f(_mm512_sub_ps(_mm512_loadu_ps(x + j), shift));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(x + j, bf16 ? round_bf16(e) : e);
  }
  total += _mm512_reduce_add_ps(sum);
  return j;
}

// attend()'s score and value passes for a head_dim that is a multiple of 16, up to 256, one K or V row in registers
template <typename T>
AVX512 void scores_avx512(const float* q, int64_t group, int64_t hd, const void* const* keys, int64_t n, float scale,
                          float* scores) {
  const int64_t chunks = hd / 16;
  __m512 row[16];
  for (int64_t j = 0; j < n; ++j) {
    const T* k = static_cast<const T*>(keys[j]);
    for (int64_t c = 0; c < chunks; ++c) row[c] = load16(k + 16 * c);
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = q + h * hd;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), row[0]);
      for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), row[c], acc);
      scores[h * n + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

template <typename T>
AVX512 void weigh_values_avx512(int64_t group, int64_t hd, const void* const* values, int64_t n, const float* scores,
                                float* out) {
  const int64_t chunks = hd / 16;
  __m512 row[16];
  for (int64_t j = 0; j < n; ++j) {
    const T* v = static_cast<const T*>(values[j]);
    for (int64_t c = 0; c < chunks; ++c) row[c] = load16(v + 16 * c);
    for (int64_t h = 0; h < group; ++h) {
      const __m512 w = _mm512_set1_ps(scores[h * n + j]);
      float* oh = out + h * hd;
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(oh + 16 * c, _mm512_fmadd_ps(w, row[c], _mm512_loadu_ps(oh + 16 * c)));
    }
  }
}
#endif

// Built for AVX512 and AVX2 as well as the baseline, one picked once by the CPU (GCC's target_clones); the
// static inline loops it calls are compiled into each, and ``#pragma omp simd`` lets reductions vectorize.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

// One KV head of one sequence: the ``group`` query heads ``q`` (group, hd) attend to the ``n`` positions whose K and
// V rows ``keys[j]``/``values[j]`` point to (bf16 or float32); ``out`` (group, hd) gets the float32 result.
// The softmax weights are rounded to bf16 for a bf16 cache before weighting V, as torch's SDPA kernel does.
VECTOR_CLONES void attend(const float* q, int64_t group, int64_t hd, const void* const* keys, const void* const* values,
                          int64_t n, bool bf16, float scale, float* scores, float* row, float* totals, float* out) {
#ifdef AVX512_PATH
  const bool vector_rows = kAvx512 && hd % 16 == 0 && hd <= 256;
  if (vector_rows && bf16) scores_avx512<c10::BFloat16>(q, group, hd, keys, n, scale, scores);
  else if (vector_rows) scores_avx512<float>(q, group, hd, keys, n, scale, scores);
  else
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (bf16) widen_row(static_cast<const c10::BFloat16*>(keys[j]), row, hd);
    else widen_row(static_cast<const float*>(keys[j]), row, hd);
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = q + h * hd;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < hd; ++i) acc += qh[i] * row[i];
      scores[h * n + j] = acc * scale;
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* sc = scores + h * n;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) top = std::max(top, sc[j]);
    float total = 0.f;
    int64_t j = 0;
#ifdef AVX512_PATH
    if (kAvx512) j = exp_shifted_avx512(sc, n, top, bf16, total);
#endif
    for (; j < n; ++j) {
      const float e = std::exp(sc[j] - top);
      total += e;
      sc[j] = bf16 ? static_cast<float>(c10::BFloat16(e)) : e;
    }
    totals[h] = total;
    for (int64_t i = 0; i < hd; ++i) out[h * hd + i] = 0.f;
  }
#ifdef AVX512_PATH
  if (vector_rows && bf16) weigh_values_avx512<c10::BFloat16>(group, hd, values, n, scores, out);
  else if (vector_rows) weigh_values_avx512<float>(group, hd, values, n, scores, out);
  else
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (bf16) widen_row(static_cast<const c10::BFloat16*>(values[j]), row, hd);
    else widen_row(static_cast<const float*>(values[j]), row, hd);
    for (int64_t h = 0; h < group; ++h) {
      const float w = scores[h * n + j];
      float* oh = out + h * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) oh[i] += w * row[i];
    }
  }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = 0; i < hd; ++i) out[h * hd + i] /= totals[h];
}

template <typename T>
void rms_norm_rows(const T* x, const T* delta, T* h_out, const T* weight, T* y, int64_t rows, int64_t n,
                   int64_t x_stride, int64_t d_stride, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      if (delta != nullptr) {
        const T* dr = delta + r * d_stride;
        T* hr = h_out + r * n;
        for (int64_t i = 0; i < n; ++i) {
          T sum = narrow<T>(widen(xr[i]) + widen(dr[i]));  // the residual add, rounded to T
          hr[i] = sum;
          h[i] = widen(sum);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) h[i] = widen(xr[i]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < n; ++i) squares += h[i] * h[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
      T* yr = y + r * n;
      for (int64_t i = 0; i < n; ++i) yr[i] = narrow<T>(widen(weight[i]) * widen(narrow<T>(h[i] * inv)));
    }
  });
}

template <typename T>
void rope_rows(T* x, const T* cos, const T* ssin, int64_t tokens, int64_t heads, int64_t hd, int64_t token_stride,
               int64_t head_stride) {
  const int64_t half = hd / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(hd);
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * hd;
      const T* s = ssin + t * hd;
      for (int64_t h = 0; h < heads; ++h) {
        T* xr = x + t * token_stride + h * head_stride;
        for (int64_t i = 0; i < hd; ++i) row[i] = widen(xr[i]);
        for (int64_t i = 0; i < hd; ++i) {
          const float rolled = row[i < half ? i + half : i - half];
          xr[i] = narrow<T>(widen(narrow<T>(row[i] * widen(c[i]))) + widen(narrow<T>(rolled * widen(s[i]))));
        }
      }
    }
  });
}

template <typename T>
void decode_attention(const T* q, T* out, const T* blocks, const int64_t* tables, const int64_t* lens, int64_t seqs,
                      int64_t heads, int64_t kv_heads, int64_t hd, int64_t max_blocks, int64_t layer,
                      int64_t num_layers, int64_t block_size, int64_t window, float scale, int64_t q_stride) {
  const int64_t group = heads / kv_heads;
  const int64_t slot = kv_heads * hd;                 // one token's K (or V) in a block
  const int64_t kv_half = block_size * slot;          // a block's K, then its V
  const int64_t page = num_layers * 2 * kv_half;      // one pool page: every layer's K and V
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * hd), acc(group * hd), row(hd), totals(group), scores;
    std::vector<const void*> keys, values;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / kv_heads, g = job % kv_heads;
      const int64_t len = lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(group * n);
      keys.resize(n);
      values.resize(n);
      const int64_t* table = tables + s * max_blocks;
      for (int64_t p = first; p < len; ++p) {
        const T* k = blocks + table[p / block_size] * page + layer * 2 * kv_half + (p % block_size) * slot + g * hd;
        keys[p - first] = k;
        values[p - first] = k + kv_half;
      }
      for (int64_t h = 0; h < group; ++h)
        for (int64_t i = 0; i < hd; ++i) qf[h * hd + i] = widen(q[s * q_stride + (g * group + h) * hd + i]);
      attend(qf.data(), group, hd, keys.data(), values.data(), n, std::is_same<T, c10::BFloat16>::value, scale,
             scores.data(), row.data(), totals.data(), acc.data());
      for (int64_t h = 0; h < group; ++h)
        for (int64_t i = 0; i < hd; ++i) out[(s * heads + g * group + h) * hd + i] = narrow<T>(acc[h * hd + i]);
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate, const T* up, T* out, int64_t rows, int64_t n, int64_t gate_stride, int64_t up_stride) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t i = 0;
#ifdef AVX512_PATH
      if (kAvx512) i = silu_mul_avx512(gate + r * gate_stride, up + r * up_stride, out + r * n, n);
#endif
      for (; i < n; ++i) {
        const float g = widen(gate[r * gate_stride + i]);
        out[r * n + i] = narrow<T>(widen(narrow<T>(g / (1.f + std::exp(-g)))) * widen(up[r * up_stride + i]));
      }
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be (rows, n) with contiguous rows");
}

}  // namespace

std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                    const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1),
              "weight must be contiguous, of x's dtype and length");
  auto y = torch::empty({x.size(0), x.size(1)}, x.options());
  torch::Tensor h;
  if (delta.has_value()) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(), "delta must match x");
    h = torch::empty_like(y);
  }
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] { rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(),
        delta ? delta->data_ptr<scalar_t>() : nullptr, h.defined() ? h.data_ptr<scalar_t>() : nullptr,
        weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0),
        delta ? delta->stride(0) : 0, eps); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(),
        delta ? delta->data_ptr<scalar_t>() : nullptr, h.defined() ? h.data_ptr<scalar_t>() : nullptr,
        weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0),
        delta ? delta->stride(0) : 0, eps); }));
  if (h.defined()) return {h, y};
  return {y};
}

torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate and up must match");
  auto out = torch::empty({gate.size(0), gate.size(1)}, gate.options());
  AT_DISPATCH_SWITCH(gate.scalar_type(), "silu_mul",
    AT_DISPATCH_CASE(at::kFloat, [&] { silu_mul_rows<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), gate.size(0), gate.size(1), gate.stride(0), up.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { silu_mul_rows<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), gate.size(0), gate.size(1), gate.stride(0), up.stride(0)); }));
  return out;
}

void rope_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be (tokens, heads, head_dim) with contiguous head rows");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.sizes() == signed_sin.sizes() &&
              cos.size(0) == x.size(0) && cos.size(-1) == x.size(2) && cos.scalar_type() == x.scalar_type() &&
              signed_sin.scalar_type() == x.scalar_type(),
              "cos and signed_sin must be contiguous (tokens, head_dim) of x's dtype");
  AT_DISPATCH_SWITCH(x.scalar_type(), "rope_",
    AT_DISPATCH_CASE(at::kFloat, [&] { rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
        signed_sin.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
        signed_sin.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1)); }));
}

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& blocks, int64_t layer,
                                     const torch::Tensor& tables, const torch::Tensor& lens, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be (seqs, heads, head_dim) with contiguous tokens");
  TORCH_CHECK(blocks.dim() == 6 && blocks.is_contiguous() && blocks.scalar_type() == q.scalar_type(),
              "blocks must be the contiguous (pages, layers, 2, block_size, kv_heads, head_dim) pool of q's dtype");
  TORCH_CHECK(tables.dim() == 2 && tables.is_contiguous() && tables.scalar_type() == at::kLong && tables.size(0) == q.size(0),
              "tables must be contiguous int64 (seqs, max_blocks)");
  TORCH_CHECK(lens.dim() == 1 && lens.is_contiguous() && lens.scalar_type() == at::kLong && lens.size(0) == q.size(0),
              "lens must be contiguous int64 (seqs,)");
  TORCH_CHECK(blocks.size(5) == q.size(2) && q.size(1) % blocks.size(4) == 0, "q's heads must be a multiple of the cache's kv heads");
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(q.size(2)));
  AT_DISPATCH_SWITCH(q.scalar_type(), "paged_decode_attention",
    AT_DISPATCH_CASE(at::kFloat, [&] { decode_attention<scalar_t>(q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        blocks.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), q.size(0), q.size(1),
        blocks.size(4), q.size(2), tables.size(1), layer, blocks.size(1), blocks.size(3), window, scale, q.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { decode_attention<scalar_t>(q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        blocks.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), q.size(0), q.size(1),
        blocks.size(4), q.size(2), tables.size(1), layer, blocks.size(1), blocks.size(3), window, scale, q.stride(0)); }));
  return out;
}

void kv_write(torch::Tensor& blocks, int64_t layer, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& pages, const torch::Tensor& offsets) {
  TORCH_CHECK(blocks.dim() == 6 && blocks.is_contiguous(), "blocks must be the contiguous (pages, layers, 2, block_size, kv_heads, head_dim) pool");
  const int64_t slot = blocks.size(4) * blocks.size(5);
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2) && t->size(1) * t->size(2) == slot &&
                t->scalar_type() == blocks.scalar_type() && t->size(0) == pages.size(0),
                "k and v must be (tokens, kv_heads, head_dim) of the pool's layout and dtype, one row per slot");
  TORCH_CHECK(pages.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && pages.is_contiguous() &&
              offsets.is_contiguous() && pages.sizes() == offsets.sizes(), "pages and offsets must be contiguous int64 (tokens,)");
  const int64_t bytes = slot * blocks.element_size(), half = blocks.size(3) * bytes, page = blocks.size(1) * 2 * half;
  auto* base = static_cast<char*>(blocks.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* of = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < pages.size(0); ++t) {
    TORCH_CHECK(pg[t] >= 0 && pg[t] < blocks.size(0) && of[t] >= 0 && of[t] < blocks.size(3), "slot out of the pool");
    char* dst = base + pg[t] * page + layer * 2 * half + of[t] * bytes;
    std::memcpy(dst, kp + t * k.stride(0) * blocks.element_size(), bytes);
    std::memcpy(dst + half, vp + t * v.stride(0) * blocks.element_size(), bytes);
  }
}

// A decode-only step's attention for one layer, in one call: rope_ on q and k, kv_write of k and v, then
// paged_decode_attention. q (T, heads·hd), k and v (T, kv_heads·hd) are row views of the fused q/k/v projection's
// output (one token per sequence); returns (T, heads·hd), the o projection's input.
torch::Tensor decode_attention_step(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                                    const torch::Tensor& signed_sin, torch::Tensor& blocks, int64_t layer,
                                    const torch::Tensor& pages, const torch::Tensor& offsets, const torch::Tensor& tables,
                                    const torch::Tensor& lens, int64_t window) {
  TORCH_CHECK(blocks.dim() == 6, "blocks must be the (pages, layers, 2, block_size, kv_heads, head_dim) pool");
  const int64_t hd = blocks.size(5), kv_heads = blocks.size(4);
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && q.size(1) % hd == 0 && k.size(1) == kv_heads * hd &&
              v.size(1) == kv_heads * hd, "q, k and v must be (tokens, heads * head_dim) rows of the pool's head_dim");
  auto q3 = q.view({q.size(0), q.size(1) / hd, hd});
  auto k3 = k.view({k.size(0), kv_heads, hd});
  rope_(q3, cos, signed_sin);
  rope_(k3, cos, signed_sin);
  kv_write(blocks, layer, k3, v.view({v.size(0), kv_heads, hd}), pages, offsets);
  return paged_decode_attention(q3, blocks, layer, tables, lens, window).view({q.size(0), q.size(1)});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "LlamaRMSNorm of x (rows, n), optionally of h = x + delta; returns [y] or [h, y]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for (rows, n) gate and up, each rounded to their dtype");
  m.def("rope_", &rope_, "rotate x (tokens, heads, head_dim) in place by cos / signed_sin (tokens, head_dim)");
  m.def("kv_write", &kv_write, "store k, v (tokens, kv_heads, head_dim) at their (page, offset) slots of one layer");
  m.def("paged_decode_attention", &paged_decode_attention,
        "attention of one query token per sequence over its paged K/V; q (seqs, heads, head_dim)");
  m.def("decode_attention_step", &decode_attention_step,
        "rope_ on q and k, kv_write, paged_decode_attention: a decode-only step's attention of one layer");
}
