// Low-bit matmul for frozen quantized weights, as llama.cpp does it: the activation rows are quantized per
// 32-block to int8 (scale d = amax/127 stored as fp16, codes round(x·127/amax) half to even, and the block's
// s = fp16(d·Σq) as in Q8_1), and each block's integer dot product with the stored 4- or 8-bit codes is
// scaled in fp32. The weights are read as stored (GGUF Q4_0/Q4_1/Q8_0 fields, INTk codes): no repacked copy.
//
// A weight's value is w = d·(q − offset) + m per block, where q is the stored code (unsigned 4-bit, or 8-bit
// signed or unsigned), d its group's scale, m its group's min (absent: 0). So y = Σ_b d_b·da_b·Σ(q−offset)·qa
// + Σ_g m_g·s_g (s_g: the s of group g's blocks, summed), the integer sums exact. Paths: AVX512-VNNI (vpdpbusd, 4
// blocks per step, the block sums of 16 blocks transposed into one vector before they are scaled; tiles of several
// weight rows; software prefetch, since at decode the weights stream from DRAM), AVX2 (maddubs, one block per
// step) and portable scalar C++, compiled in this one file with per-function target attributes and chosen at run
// time, so the library runs on any x86-64 (and builds elsewhere with the scalar path).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif

namespace {

constexpr int64_t BLOCK = 32;

struct Format {
  int bits;          // 4 or 8
  bool pairs;        // 4-bit order: false = GGUF (byte j holds elements j, j+16), true = INTk (elements 2j, 2j+1)
  bool is_signed;    // 8-bit codes stored as int8 (Q8_0)
  int offset;        // the value code is q − offset (Q4_0: 8)
  int group_blocks;  // 32-blocks per scale/min group
};

struct Weight {
  const uint8_t* codes;     // (rows, nb·bits·4) bytes
  const uint16_t* scale;    // (rows, groups) fp16
  const uint16_t* min;      // (rows, groups) fp16, or null
  int64_t rows;
};

// Activation rows quantized per block; q is in the kernel's element order (pair formats permuted per block).
struct Act {
  int64_t M, K, nb, ng;
  std::vector<int8_t> q;     // (M, K)
  std::vector<float> d;      // (M, nb) the fp16-rounded scale
  std::vector<int32_t> sum;  // (M, nb) Σq per block
  std::vector<float> s;      // (M, ng) Σ over the group's blocks of fp16(d·Σq), d unrounded
};

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline float round_to_half(float v) { return static_cast<float>(c10::Half(v)); }
// Round half to even for |v| < 2^22 by the fp32 adder itself (no libm call, which costs ~50 ns per element):
// adding 1.5·2^23 leaves no fraction bits, so the sum is rounded to an integer in the default rounding mode.
inline float round_half_even(float v) {
  constexpr float magic = 12582912.f;
  return (v + magic) - magic;
}

// x: (M, K) contiguous rows in float, bfloat16 or half (read as fp32; no converted copy of x is made).
Act quantize_activation(const at::Tensor& x, const Format& f) {
  const at::Tensor rows = x.contiguous();
  const int64_t M = rows.size(0), K = rows.size(1);
  std::vector<float> row(K);
  Act a{M, K, K / BLOCK, K / BLOCK / f.group_blocks, {}, {}, {}, {}};
  a.q.resize(M * K);
  a.d.resize(M * a.nb);
  a.sum.resize(M * a.nb);
  a.s.assign(M * a.ng, 0.f);
  for (int64_t r = 0; r < M; ++r) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "lowbit_quantize", [&] {
      const scalar_t* src = rows.data_ptr<scalar_t>() + r * K;
      for (int64_t i = 0; i < K; ++i) row[i] = static_cast<float>(src[i]);
    });
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* xb = row.data() + b * BLOCK;
      float amax = 0.f;
      for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f;
      const float id = amax != 0.f ? 127.f / amax : 0.f;
      int8_t codes[BLOCK];
      int32_t sum = 0;
      for (int i = 0; i < BLOCK; ++i) {
        codes[i] = static_cast<int8_t>(round_half_even(xb[i] * id));
        sum += codes[i];
      }
      int8_t* out = a.q.data() + r * K + b * BLOCK;
      for (int i = 0; i < BLOCK; ++i) out[i] = f.pairs ? codes[i < 16 ? 2 * i : 2 * (i - 16) + 1] : codes[i];
      a.d[r * a.nb + b] = round_to_half(d);
      a.sum[r * a.nb + b] = sum;
      a.s[r * a.ng + b / f.group_blocks] += round_to_half(d * static_cast<float>(sum));
    }
  }
  return a;
}


// ---------------------------------------------------------------- scalar
void rows_scalar(const Format& f, const Weight& w, int64_t n, const Act& a, int64_t r0, int64_t rows, float* y, int64_t ldy) {
  const int64_t row_bytes = a.nb * f.bits * 4;
  const uint8_t* c = w.codes + n * row_bytes;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < a.nb; ++b) {
      const int8_t* q = a.q.data() + r * a.K + b * BLOCK;
      int32_t isum = 0;
      if (f.bits == 4) {
        const uint8_t* cb = c + b * 16;
        for (int j = 0; j < 16; ++j) isum += (cb[j] & 15) * q[j] + (cb[j] >> 4) * q[j + 16];
      } else {
        const uint8_t* cb = c + b * BLOCK;
        for (int j = 0; j < BLOCK; ++j) isum += (f.is_signed ? static_cast<int32_t>(static_cast<int8_t>(cb[j])) : cb[j]) * q[j];
      }
      isum -= f.offset * a.sum[r * a.nb + b];
      acc += half_to_float(w.scale[n * a.ng + b / f.group_blocks]) * a.d[r * a.nb + b] * static_cast<float>(isum);
    }
    if (w.min) {
      for (int64_t g = 0; g < a.ng; ++g) acc += half_to_float(w.min[n * a.ng + g]) * a.s[r * a.ng + g];
    }
    y[r * ldy] = acc;
  }
}

#ifdef LOWBIT_X86
// ---------------------------------------------------------------- AVX2 (maddubs), one block per step
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS, int MR>
AVX2_TARGET void rows_avx2(const Format& f, const Weight& w, int64_t n, const Act& a, int64_t r0, float* y, int64_t ldy) {
  const uint8_t* c = w.codes + n * a.nb * BITS * 4;
  const uint16_t* scale = w.scale + n * a.ng;
  const uint16_t* mins = w.min ? w.min + n * a.ng : nullptr;
  float accm[MR] = {};
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  // Integer correction per block: 4-bit −offset·Σq; unsigned 8-bit codes run as signed (u − 128): +128·Σq.
  const int corr = BITS == 4 ? -f.offset : (f.is_signed ? 0 : 128);
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256i wv;
    if (BITS == 4) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b * 16));
      wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), low4);
    } else {
      wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * BLOCK));
      if (!f.is_signed) wv = _mm256_xor_si256(wv, flip);
    }
    const __m256i wabs = BITS == 4 ? wv : _mm256_sign_epi8(wv, wv);
    const float dw = _cvtsh_ss(scale[b / f.group_blocks]);
    for (int r = 0; r < MR; ++r) {
      const int64_t row = r0 + r;
      const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * a.K + b * BLOCK));
      const __m256i p16 = _mm256_maddubs_epi16(wabs, BITS == 4 ? qa : _mm256_sign_epi8(qa, wv));
      __m256i p32 = _mm256_madd_epi16(p16, ones);
      if (corr) p32 = _mm256_add_epi32(p32, _mm256_zextsi128_si256(_mm_cvtsi32_si128(corr * a.sum[row * a.nb + b])));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d[row * a.nb + b]), _mm256_cvtepi32_ps(p32), acc[r]);
    }
  }
  for (int64_t g = 0; mins && g < a.ng; ++g) {
    const float m = _cvtsh_ss(mins[g]);
    for (int r = 0; r < MR; ++r) accm[r] += m * a.s[(r0 + r) * a.ng + g];
  }
  for (int r = 0; r < MR; ++r) y[(r0 + r) * ldy] = hsum256(acc[r]) + accm[r];
}

// ---------------------------------------------------------------- AVX512-VNNI (vpdpbusd), four blocks per step
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// The activation for the VNNI kernel, quantized straight into its layout. Per row (zero-padded past nb):
// - q: per chunk of 4 blocks, 128 code bytes (4-bit weights: the 4 blocks' first halves, then their second halves,
//   to match the nibble unpack; 8-bit: as is);
// - d, corr: per stretch of 16 blocks (4 chunks), 16 lanes in the order the kernel's integer sums come out of its
//   4×4 transpose: lane 4k + j holds block 4j + k (chunk j, block k of it): the fp16-rounded scale, and the
//   integer correction (4-bit: −offset·Σq; signed 8-bit: −128·Σq, since vpdpbusd's weight operand is unsigned);
// - s: per group, Σ over its blocks of fp16(d·Σq) (the min term).
// The buffers are the calling thread's, reused from call to call (no allocation per token).
struct Act512 {
  int64_t M, K, nb, ng, chunks, stretches;
  int8_t* q;
  float* d;
  int32_t* corr;
  float* s;
  alignas(64) int32_t spread[16];  // lane 4k + j -> the group of block 4j + k within a stretch's groups
};

// vpdpbusd multiplies unsigned bytes: signed 8-bit codes run as q + 128 (−128·Σq), 4-bit as q (−offset·Σq).
int vnni_corrections(const Format& f) { return f.bits == 4 ? -f.offset : (f.is_signed ? -128 : 0); }

template <typename T>
T* scratch(std::vector<T>& v, int64_t n) {
  v.assign(n, T(0));
  return v.data();
}

// 32 inputs of a block as two fp32 vectors (bf16 widened exactly, fp16 by F16C).
template <typename scalar_t>
VNNI_TARGET inline void load_block(const scalar_t* src, __m512& x0, __m512& x1) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    x0 = _mm512_loadu_ps(src);
    x1 = _mm512_loadu_ps(src + 16);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m512i raw = _mm512_loadu_si512(src);
    x0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
    x1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
  } else {
    x0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    x1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src) + 1));
  }
}

// The same quantization as quantize_activation (codes: fp32 x·(127/amax), rounded half to even by cvtps's default
// rounding mode, as the scalar path's magic-number add does), into the layout Act512 describes.
template <typename scalar_t>
VNNI_TARGET void quantize_vnni_rows(const scalar_t* x, const Format& f, Act512& a) {
  const int correction = vnni_corrections(f);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t r = 0; r < a.M; ++r) {
    const scalar_t* src = x + r * a.K;
    for (int64_t b = 0; b < a.nb; ++b) {
      __m512 x0, x1;
      load_block(src + b * BLOCK, x0, x1);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
      const float scale = amax / 127.f;
      const __m512 id = _mm512_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
      __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), c1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
      if (f.pairs) {  // INTk: byte j holds elements 2j (low nibble) and 2j + 1 (high)
        const __m512i even = _mm512_permutex2var_epi32(c0, evens, c1);
        c1 = _mm512_permutex2var_epi32(c0, odds, c1);
        c0 = even;
      }
      int8_t* dst = a.q + (r * a.chunks + b / 4) * 128;
      const int64_t k = b % 4;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (f.bits == 4 ? 16 * k : 32 * k)), _mm512_cvtepi32_epi8(c0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (f.bits == 4 ? 64 + 16 * k : 32 * k + 16)), _mm512_cvtepi32_epi8(c1));
      const int64_t lane = (r * a.stretches + b / 16) * 16 + 4 * k + (b % 16) / 4;
      a.d[lane] = round_to_half(scale);
      a.corr[lane] = correction * sum;
      a.s[r * a.ng + b / f.group_blocks] += round_to_half(scale * static_cast<float>(sum));
    }
  }
}

Act512 quantize_vnni(const at::Tensor& rows, const Format& f) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d, s;
  thread_local std::vector<int32_t> corr;
  const int64_t M = rows.size(0), K = rows.size(1), nb = K / BLOCK;
  Act512 a{M, K, nb, nb / f.group_blocks, (nb + 3) / 4, (nb + 15) / 16, nullptr, nullptr, nullptr, nullptr, {}};
  a.q = scratch(q, M * a.chunks * 128);
  a.d = scratch(d, M * a.stretches * 16);
  a.corr = scratch(corr, M * a.stretches * 16);
  a.s = scratch(s, M * a.ng);
  for (int lane = 0; lane < 16; ++lane) a.spread[lane] = (4 * (lane % 4) + lane / 4) / f.group_blocks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "lowbit_quantize_vnni",
                                  [&] { quantize_vnni_rows(rows.data_ptr<scalar_t>(), f, a); });
  return a;
}

inline uint64_t byte_mask(int64_t bytes) { return bytes >= 64 ? ~0ULL : bytes <= 0 ? 0ULL : (1ULL << bytes) - 1; }

// Four vectors whose 128-bit lane k holds 4 partial sums of one item (k = 0..3): one vector whose lane k holds, in
// dword j, the full sum of vector j's lane-k item.
VNNI_TARGET inline __m512i transpose_sum(__m512i i0, __m512i i1, __m512i i2, __m512i i3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(i0, i1), _mm512_unpackhi_epi32(i0, i1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(i2, i3), _mm512_unpackhi_epi32(i2, i3));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

// The four horizontal sums of a0..a3, in that order.
VNNI_TARGET inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// Where to prefetch: the weight rows a few rows ahead of the tile being computed (possibly the next weight's).
struct Ahead {
  const uint8_t* codes;  // null: nothing to prefetch
  const uint16_t* scale;
  const uint16_t* min;
};

// NR weight rows (n..n+NR−1) against MR activation rows (r0..), per stretch of 16 blocks: the integer block sums of
// its 4 chunks, transposed to one vector per (weight row, activation row) (lane order as Act512's d), converted and
// scaled once; the min term as its own 16-wide loop over groups. Prefetches the codes, scales and mins of the rows
// `ahead` points at, one line per 64 code bytes consumed.
template <int BITS, int NR, int MR, bool CORR, typename Out>
VNNI_TARGET void tile_vnni(const Format& f, const Weight& w, int64_t n, const Act512& a, int64_t r0, Out* y, int64_t ldy,
                           const Ahead& ahead) {
  const int64_t row_bytes = a.nb * BITS * 4;
  const int gb = f.group_blocks;
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i spread = _mm512_load_si512(a.spread);
  __m512 acc[NR * MR];  // weight row i, activation row r at i·MR + r
  for (int k = 0; k < NR * MR; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t st = 0; st < a.stretches; ++st) {
    const int64_t b0 = st * 16, blocks = std::min<int64_t>(16, a.nb - b0), g0 = b0 / gb;
    if (ahead.codes) {
      for (int i = 0; i < NR; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead.scale + i * a.ng + g0), _MM_HINT_T0);
        if (ahead.min) _mm_prefetch(reinterpret_cast<const char*>(ahead.min + i * a.ng + g0), _MM_HINT_T0);
      }
    }
    __m512i isum[NR][MR][4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t in_chunk = blocks - 4 * j;
      if (in_chunk <= 0) {
        for (int i = 0; i < NR; ++i)
          for (int r = 0; r < MR; ++r) isum[i][r][j] = _mm512_setzero_si512();
        continue;
      }
      const int64_t chunk = st * 4 + j;
      __m512i q0[MR], q1[MR];
      for (int r = 0; r < MR; ++r) {
        q0[r] = _mm512_loadu_si512(a.q + ((r0 + r) * a.chunks + chunk) * 128);
        q1[r] = _mm512_loadu_si512(a.q + ((r0 + r) * a.chunks + chunk) * 128 + 64);
      }
      for (int i = 0; i < NR; ++i) {
        const uint8_t* c = w.codes + (n + i) * row_bytes + chunk * BITS * 16;
        if (ahead.codes) {
          const char* p = reinterpret_cast<const char*>(ahead.codes + i * row_bytes + chunk * BITS * 16);
          _mm_prefetch(p, _MM_HINT_T0);
          if (BITS == 8) _mm_prefetch(p + 64, _MM_HINT_T0);
        }
        if (BITS == 4) {
          const __m512i x = _mm512_maskz_loadu_epi8(byte_mask(16 * in_chunk), c);
          const __m512i w0 = _mm512_and_si512(x, low4), w1 = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
          for (int r = 0; r < MR; ++r)
            isum[i][r][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, q0[r]), w1, q1[r]);
        } else {  // each product holds 2 blocks (8 dwords each): regroup to one block per 128-bit lane
          __m512i w0 = _mm512_maskz_loadu_epi8(byte_mask(32 * in_chunk), c);
          __m512i w1 = _mm512_maskz_loadu_epi8(byte_mask(32 * in_chunk - 64), c + 64);
          if (f.is_signed) {
            w0 = _mm512_xor_si512(w0, flip);
            w1 = _mm512_xor_si512(w1, flip);
          }
          for (int r = 0; r < MR; ++r) {
            const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, q0[r]);
            const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, q1[r]);
            isum[i][r][j] = _mm512_add_epi32(_mm512_shuffle_i32x4(p0, p1, 0x88), _mm512_shuffle_i32x4(p0, p1, 0xDD));
          }
        }
      }
    }
    const int64_t groups = std::min<int64_t>(16 / gb, a.ng - g0);
    for (int i = 0; i < NR; ++i) {
      const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << groups) - 1), w.scale + (n + i) * a.ng + g0);
      const __m512 dw = _mm512_permutexvar_ps(spread, _mm512_cvtph_ps(h));
      for (int r = 0; r < MR; ++r) {
        const int64_t lanes = ((r0 + r) * a.stretches + st) * 16;
        __m512i t = transpose_sum(isum[i][r][0], isum[i][r][1], isum[i][r][2], isum[i][r][3]);
        if (CORR) t = _mm512_add_epi32(t, _mm512_loadu_si512(a.corr + lanes));
        acc[i * MR + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dw, _mm512_loadu_ps(a.d + lanes)), acc[i * MR + r]);
      }
    }
  }
  if (w.min) {
    for (int64_t g = 0; g < a.ng; g += 16) {
      const __mmask16 mask = static_cast<__mmask16>(a.ng - g >= 16 ? 0xFFFF : (1u << (a.ng - g)) - 1);
      for (int i = 0; i < NR; ++i) {
        const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.min + (n + i) * a.ng + g));
        for (int r = 0; r < MR; ++r)
          acc[i * MR + r] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(mask, a.s + (r0 + r) * a.ng + g), acc[i * MR + r]);
      }
    }
  }
  if constexpr (NR * MR == 4) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, hsum4(acc[0], acc[1], acc[2], acc[3]));
    for (int k = 0; k < 4; ++k) y[(r0 + k % MR) * ldy + n + k / MR] = static_cast<Out>(sums[k]);
  } else {
    for (int k = 0; k < NR * MR; ++k) y[(r0 + k % MR) * ldy + n + k / MR] = static_cast<Out>(_mm512_reduce_add_ps(acc[k]));
  }
}

// Measured on the default model's decode sequence (benchmarks/native_decode_stream.py, Zen 4, one thread; the ~92 MiB
// of weights come from DRAM): software prefetch PREFETCH_BYTES of codes ahead (2-6 KiB within 4% of each other,
// 1 KiB 10% slower, none ~40% slower on the 4-bit calls), and 4-row tiles only while a row's codes take at most
// TILE_ROW_BYTES: on longer rows (576×1536 Q4_1, the Q8_0 head) 4 interleaved row streams read ~40% slower than one
// row at a time, while on the 288-byte rows of 960/3072×576 Q4_1 the 4-row tiles are ~25% faster.
constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int64_t TILE_ROW_BYTES = 512;

// Prefetch every line of global rows [from, to): what the per-tile prefetch, which runs ahead_rows ahead, never covers.
VNNI_TARGET void prefetch_rows(const std::vector<Weight>& weights, const std::vector<int64_t>& starts, int64_t from, int64_t to,
                               int64_t row_bytes, int64_t ng) {
  size_t i = std::upper_bound(starts.begin(), starts.end(), from) - starts.begin() - 1;
  for (int64_t n = from; n < to; ++n) {
    while (n >= starts[i + 1]) ++i;
    const Weight& w = weights[i];
    const int64_t local = n - starts[i];
    const char* c = reinterpret_cast<const char*>(w.codes + local * row_bytes);
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.scale + local * ng), _MM_HINT_T0);
    if (w.min) _mm_prefetch(reinterpret_cast<const char*>(w.min + local * ng), _MM_HINT_T0);
  }
}

// Global rows [begin, end) of the weights side by side (weight i holds rows starts[i]..starts[i+1]) into y (M, N):
// tiles of NR weight rows (short rows: 4 for one activation row, else 2; long rows: 1), each against every
// activation row (MR = 2 at a time, 4 with one-row tiles) while its codes are in L1, prefetching the rows PREFETCH_BYTES ahead (across
// the next weight's start; the first rows up front).
template <int BITS, bool CORR, typename Out>
VNNI_TARGET void rows_vnni(const Format& f, const std::vector<Weight>& weights, const std::vector<int64_t>& starts,
                           const Act512& a, int64_t begin, int64_t end, Out* y, int64_t N) {
  const int64_t row_bytes = a.nb * BITS * 4, nr = row_bytes > TILE_ROW_BYTES ? 1 : a.M == 1 ? 4 : 2;
  const int64_t ahead_rows = std::max<int64_t>(nr, (PREFETCH_BYTES + row_bytes - 1) / row_bytes);
  prefetch_rows(weights, starts, begin, std::min(end, begin + ahead_rows), row_bytes, a.ng);
  size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1, j = i;
  for (int64_t n = begin; n < end;) {
    while (n >= starts[i + 1]) ++i;
    const Weight& w = weights[i];
    const int64_t local = n - starts[i], tile = std::min(end, starts[i + 1]) - n >= nr ? nr : 1;
    Ahead ahead{nullptr, nullptr, nullptr};
    if (const int64_t t = n + ahead_rows; t < end) {
      while (t >= starts[j + 1]) ++j;
      const Weight& u = weights[j];
      const int64_t at = t - starts[j];
      ahead = Ahead{u.codes + at * row_bytes, u.scale + at * a.ng, u.min ? u.min + at * a.ng : nullptr};
    }
    Out* yw = y + starts[i];
    for (int64_t r0 = 0; r0 < a.M;) {
      const int64_t mr = std::min<int64_t>(a.M - r0, tile == 1 ? 4 : 2);
      const Ahead& h = r0 == 0 ? ahead : Ahead{nullptr, nullptr, nullptr};
      if (tile == 4) tile_vnni<BITS, 4, 1, CORR>(f, w, local, a, r0, yw, N, h);
      else if (tile == 2 && mr == 2) tile_vnni<BITS, 2, 2, CORR>(f, w, local, a, r0, yw, N, h);
      else if (tile == 2) tile_vnni<BITS, 2, 1, CORR>(f, w, local, a, r0, yw, N, h);
      else if (mr == 4) tile_vnni<BITS, 1, 4, CORR>(f, w, local, a, r0, yw, N, h);
      else if (mr == 3) tile_vnni<BITS, 1, 3, CORR>(f, w, local, a, r0, yw, N, h);
      else if (mr == 2) tile_vnni<BITS, 1, 2, CORR>(f, w, local, a, r0, yw, N, h);
      else tile_vnni<BITS, 1, 1, CORR>(f, w, local, a, r0, yw, N, h);
      r0 += mr;
    }
    n += tile;
  }
}
#endif  // LOWBIT_X86

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, VNNI = 2 };

const std::vector<std::string>& isa_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> found;
#ifdef LOWBIT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c"))
      found.push_back("avx512_vnni");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      found.push_back("avx2");
#endif
    found.push_back("scalar");
    return found;
  }();
  return names;
}

std::vector<std::string> available_isas() { return isa_names(); }

Isa isa_of(const std::string& name) {
  const auto& names = isa_names();
  const std::string& chosen = name.empty() ? names.front() : name;
  TORCH_CHECK(std::find(names.begin(), names.end(), chosen) != names.end(), "lowbit: instruction set '", chosen,
              "' is not available on this CPU (available: ", c10::Join(", ", names), ")");
  return chosen == "avx512_vnni" ? VNNI : chosen == "avx2" ? AVX2 : SCALAR;
}

// The AVX2 and scalar paths: one weight row against the activation rows, 4 at a time.
template <int BITS>
void run_rows([[maybe_unused]] Isa isa, const Format& f, const Weight& w, int64_t n, const Act& a, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < a.M; r0 += 4) {
    const int64_t rows = std::min<int64_t>(4, a.M - r0);
#ifdef LOWBIT_X86
    if (isa == AVX2) {
      switch (rows) {
        case 1: rows_avx2<BITS, 1>(f, w, n, a, r0, y, ldy); break;
        case 2: rows_avx2<BITS, 2>(f, w, n, a, r0, y, ldy); break;
        case 3: rows_avx2<BITS, 3>(f, w, n, a, r0, y, ldy); break;
        default: rows_avx2<BITS, 4>(f, w, n, a, r0, y, ldy);
      }
      continue;
    }
#endif
    rows_scalar(f, w, n, a, r0, rows, y, ldy);
  }
}

Format format_of(int64_t bits, bool pairs, bool is_signed, int64_t offset, int64_t group_blocks) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_blocks == 1 || group_blocks == 2 || group_blocks == 4, "lowbit: group_blocks must be 1, 2 or 4");
  return Format{static_cast<int>(bits), pairs, is_signed, static_cast<int>(offset), static_cast<int>(group_blocks)};
}

// Output rows per parallel_for task: enough work per task that splitting pays (~32K multiply-adds).
int64_t grain_of(int64_t K, int64_t M) { return std::max<int64_t>(16, 32768 / std::max<int64_t>(1, K * M)); }

}  // namespace

// Weights of one input and one format, multiplied side by side: per weight i, codes (N_i, K·bits/8) uint8 or int8,
// scales (N_i, groups) fp16, mins the same or an empty tensor. Checked once when built; it holds references to
// the tensors (no copy), so a decode step's call passes only its input.
class Group {
 public:
  Group(const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales, const std::vector<at::Tensor>& mins,
        int64_t bits, bool pairs, bool is_signed, int64_t offset, int64_t group_blocks)
      : f_(format_of(bits, pairs, is_signed, offset, group_blocks)), tensors_{codes, scales, mins}, starts_{0} {
    TORCH_CHECK(codes.size() == scales.size() && codes.size() == mins.size() && !codes.empty(),
                "lowbit: one codes, scales and mins per weight");
    for (const auto& c : codes) {  // K from the first weight with rows (every weight must agree, checked below)
      if (c.dim() > 0 && c.size(0) > 0) {
        K_ = c.numel() / c.size(0) * 8 / bits;
        break;
      }
    }
    for (size_t i = 0; i < codes.size(); ++i) {
      const int64_t N = codes[i].size(0);
      TORCH_CHECK(codes[i].is_contiguous() && codes[i].element_size() == 1 && codes[i].numel() == N * K_ * bits / 8,
                  "lowbit: weight ", i, ": codes must be contiguous bytes (N, K·bits/8) with one K for all weights");
      TORCH_CHECK(scales[i].scalar_type() == at::kHalf && scales[i].is_contiguous() &&
                      scales[i].numel() == N * K_ / BLOCK / group_blocks,
                  "lowbit: weight ", i, ": scales must be contiguous fp16 (N, groups)");
      const bool has_min = mins[i].numel() != 0;
      TORCH_CHECK(!has_min || (mins[i].scalar_type() == at::kHalf && mins[i].is_contiguous() && mins[i].numel() == scales[i].numel()),
                  "lowbit: weight ", i, ": mins must be like scales, or empty");
      weights_.push_back(Weight{static_cast<const uint8_t*>(codes[i].data_ptr()), reinterpret_cast<const uint16_t*>(scales[i].data_ptr()),
                                has_min ? reinterpret_cast<const uint16_t*>(mins[i].data_ptr()) : nullptr, N});
      starts_.push_back(starts_.back() + N);
    }
  }

  // x (M, K) float/bf16/half -> (M, ΣN_i) in x's dtype: the weights' products side by side.
  at::Tensor mm(const at::Tensor& x, const std::string& isa_name) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K_ && K_ % (BLOCK * f_.group_blocks) == 0,
                "lowbit: x must be (M, ", K_, ") with K a multiple of ", BLOCK * f_.group_blocks, ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "lowbit: x must be float32, bfloat16 or float16, got ", x.scalar_type());
    const Isa isa = isa_of(isa_name);
    const at::Tensor rows = x.contiguous();
    const int64_t M = rows.size(0), N = starts_.back();
    at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
#ifdef LOWBIT_X86
    if (isa == VNNI) {
      const Act512 a = quantize_vnni(rows, f_);
      const bool corr = vnni_corrections(f_) != 0;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lowbit_vnni", [&] {
        scalar_t* out = y.data_ptr<scalar_t>();
        at::parallel_for(0, N, grain_of(K_, M), [&](int64_t begin, int64_t end) {
          if (f_.bits == 4) {
            corr ? rows_vnni<4, true>(f_, weights_, starts_, a, begin, end, out, N)
                 : rows_vnni<4, false>(f_, weights_, starts_, a, begin, end, out, N);
          } else {
            corr ? rows_vnni<8, true>(f_, weights_, starts_, a, begin, end, out, N)
                 : rows_vnni<8, false>(f_, weights_, starts_, a, begin, end, out, N);
          }
        });
      });
      return y;
    }
#endif
    const Act a = quantize_activation(rows, f_);
    const bool fp32 = x.scalar_type() == at::kFloat;
    std::vector<float> buffer(fp32 ? 0 : M * N);
    float* out = fp32 ? y.data_ptr<float>() : buffer.data();
    at::parallel_for(0, N, grain_of(K_, M), [&](int64_t begin, int64_t end) {
      size_t i = std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1;
      for (int64_t n = begin; n < end; ++n) {
        while (n >= starts_[i + 1]) ++i;
        if (f_.bits == 4) run_rows<4>(isa, f_, weights_[i], n - starts_[i], a, out + n, N);
        else run_rows<8>(isa, f_, weights_[i], n - starts_[i], a, out + n, N);
      }
    });
    if (!fp32) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lowbit_store", [&] {
        scalar_t* dst = y.data_ptr<scalar_t>();
        for (int64_t i = 0; i < M * N; ++i) dst[i] = static_cast<scalar_t>(buffer[i]);
      });
    }
    return y;
  }

 private:
  Format f_;
  std::vector<std::vector<at::Tensor>> tensors_;  // kept alive while the raw pointers below are in use
  std::vector<Weight> weights_;
  std::vector<int64_t> starts_;
  int64_t K_ = 0;
};

// The same as Group(codes, scales, mins, ...).mm(x, isa), in one call (tests, benchmarks).
at::Tensor mm(const at::Tensor& x, const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
              const std::vector<at::Tensor>& mins, int64_t bits, bool pairs, bool is_signed, int64_t offset,
              int64_t group_blocks, const std::string& isa_name) {
  return Group(codes, scales, mins, bits, pairs, is_signed, offset, group_blocks).mm(x, isa_name);
}

// The activation quantization alone (GGUF element order), for tests: int8 codes (M, K), fp16-rounded scales
// d (M, K/32) and s (M, K/32), as described at the top.
std::vector<at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % BLOCK == 0, "lowbit: x must be (M, K) with K a multiple of 32, got ", x.sizes());
  const Format f = format_of(4, false, false, 0, 1);
  const Act a = quantize_activation(x.to(at::kFloat), f);
  auto q = at::empty({a.M, a.K}, at::kChar), d = at::empty({a.M, a.nb}, at::kFloat), s = at::empty({a.M, a.nb}, at::kFloat);
  std::copy(a.q.begin(), a.q.end(), q.data_ptr<int8_t>());
  std::copy(a.d.begin(), a.d.end(), d.data_ptr<float>());
  std::copy(a.s.begin(), a.s.end(), s.data_ptr<float>());
  return {q, d, s};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Group>(m, "Group", pybind11::module_local(), "weights of one input, checked once, multiplied side by side")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          int64_t, bool, bool, int64_t, int64_t>())
      .def("mm", &Group::mm, "x @ W.T for the weights side by side, the activation quantized to int8 per 32-block");
  m.def("mm", &mm, "x @ W.T for low-bit block weights, the activation quantized to int8 per 32-block");
  m.def("quantize_rows", &quantize_rows, "the activation quantization alone (tests)");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs, fastest first");
}
