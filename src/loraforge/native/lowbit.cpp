// Low-bit matmul for frozen quantized weights, as llama.cpp does it: the activation rows are quantized per
// 32-block to int8 (scale d = amax/127 stored as fp16, codes round(x·127/amax) half to even, and the block's
// s = fp16(d·Σq) as in Q8_1), and each block's integer dot product with the stored 4- or 8-bit codes is
// scaled in fp32. The weights are read as stored (GGUF Q4_0/Q4_1/Q8_0 fields, INTk codes): no repacked copy.
//
// A weight's value is w = d·(q − offset) + m per block, where q is the stored code (unsigned 4-bit, or 8-bit
// signed or unsigned), d its group's scale, m its group's min (absent: 0). So y = Σ_b d_b·da_b·Σ(q−offset)·qa
// + Σ_g m_g·s_g (s_g: the s of group g's blocks, summed), the integer sums exact. Paths: AVX512-VNNI (vpdpbusd, 4 blocks per step), AVX2 (maddubs,
// one block per step) and portable scalar C++, compiled in this one file with per-function target attributes
// and chosen at run time, so the library runs on any x86-64 (and builds elsewhere with the scalar path).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// The activation laid out for the VNNI kernel, per row and per chunk of 4 blocks (zero-padded past nb):
// 128 code bytes (4-bit weights: the 4 blocks' first halves, then their second halves, to match the nibble
// unpack; 8-bit: as is), 16 int32 corrections (block k's at dword 4k), 16 floats (block k's scale in dwords 4k..4k+3).
struct Act512 {
  int64_t chunks;
  std::vector<int8_t> q;
  std::vector<int32_t> corr;
  std::vector<float> d;
  // chunk k of a 16-block stretch: dword j takes block 4k + j/4, whose scale is group (4k + j/4)/gb of the stretch
  alignas(64) int32_t spread[4][16];
};

// vpdpbusd multiplies unsigned bytes: signed 8-bit codes run as q + 128 (−128·Σq), 4-bit as q (−offset·Σq).
int vnni_corrections(const Format& f) { return f.bits == 4 ? -f.offset : (f.is_signed ? -128 : 0); }

Act512 layout_vnni(const Act& a, const Format& f) {
  Act512 v{(a.nb + 3) / 4, {}, {}, {}, {}};
  v.q.assign(a.M * v.chunks * 128, 0);
  v.corr.assign(a.M * v.chunks * 16, 0);
  v.d.assign(a.M * v.chunks * 16, 0.f);
  for (int k = 0; k < 4; ++k) {
    for (int j = 0; j < 16; ++j) v.spread[k][j] = (4 * k + j / 4) / f.group_blocks;
  }
  const int corr = vnni_corrections(f);
  for (int64_t r = 0; r < a.M; ++r) {
    for (int64_t b = 0; b < a.nb; ++b) {
      const int64_t chunk = r * v.chunks + b / 4, k = b % 4;
      const int8_t* src = a.q.data() + r * a.K + b * BLOCK;
      int8_t* dst = v.q.data() + chunk * 128;
      for (int i = 0; i < BLOCK; ++i) {
        dst[f.bits == 4 ? (i < 16 ? 16 * k + i : 64 + 16 * k + i - 16) : 32 * k + i] = src[i];
      }
      v.corr[chunk * 16 + 4 * k] = corr * a.sum[r * a.nb + b];
      for (int j = 0; j < 4; ++j) v.d[chunk * 16 + 4 * k + j] = a.d[r * a.nb + b];
    }
  }
  return v;
}

inline uint64_t byte_mask(int64_t bytes) { return bytes >= 64 ? ~0ULL : bytes <= 0 ? 0ULL : (1ULL << bytes) - 1; }

// One weight row against MR activation rows. Scales are converted 16 groups at a time and spread to each chunk's
// lanes by one permute; the min term runs as its own 16-wide loop over groups.
template <int BITS, int MR, bool CORR>
VNNI_TARGET void rows_vnni(const Format& f, const Weight& w, int64_t n, const Act& a, const Act512& v, int64_t r0, float* y, int64_t ldy) {
  const uint8_t* c = w.codes + n * a.nb * BITS * 4;
  const uint16_t* scale = w.scale + n * a.ng;
  const int gb = f.group_blocks;
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MR], scales = _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < v.chunks; ++ch) {
    const int64_t b0 = ch * 4, blocks = std::min<int64_t>(4, a.nb - b0);
    if (ch % 4 == 0) {  // scales of the next 16 blocks
      const int64_t g0 = b0 / gb, groups = std::min<int64_t>(16 / gb, a.ng - g0);
      const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << groups) - 1), scale + g0);
      scales = _mm512_cvtph_ps(h);
    }
    const __m512 dw = _mm512_permutexvar_ps(_mm512_load_si512(v.spread[ch % 4]), scales);
    __m512i w0, w1;
    if (BITS == 4) {
      const __m512i x = _mm512_maskz_loadu_epi8(byte_mask(16 * blocks), c + b0 * 16);
      w0 = _mm512_and_si512(x, low4);
      w1 = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
    } else {
      w0 = _mm512_maskz_loadu_epi8(byte_mask(32 * blocks), c + b0 * BLOCK);
      w1 = _mm512_maskz_loadu_epi8(byte_mask(32 * blocks - 64), c + b0 * BLOCK + 64);
      if (f.is_signed) {
        w0 = _mm512_xor_si512(w0, flip);
        w1 = _mm512_xor_si512(w1, flip);
      }
    }
    for (int r = 0; r < MR; ++r) {
      const int64_t at = (r0 + r) * v.chunks + ch;
      const __m512i q0 = _mm512_loadu_si512(v.q.data() + at * 128), q1 = _mm512_loadu_si512(v.q.data() + at * 128 + 64);
      const __m512i start = CORR ? _mm512_loadu_si512(v.corr.data() + at * 16) : _mm512_setzero_si512();
      __m512i isum;
      if (BITS == 4) {
        isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, w0, q0), w1, q1);
      } else {  // each product holds 2 blocks (8 dwords each): regroup to 4 dwords per block
        const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, q0);
        const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, q1);
        isum = _mm512_add_epi32(_mm512_add_epi32(_mm512_shuffle_i32x4(p0, p1, 0x88), _mm512_shuffle_i32x4(p0, p1, 0xDD)), start);
      }
      const __m512 da = _mm512_loadu_ps(v.d.data() + at * 16);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, da), acc[r]);
    }
  }
  if (w.min) {
    const uint16_t* mins = w.min + n * a.ng;
    for (int64_t g = 0; g < a.ng; g += 16) {
      const __mmask16 mask = static_cast<__mmask16>(a.ng - g >= 16 ? 0xFFFF : (1u << (a.ng - g)) - 1);
      const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mins + g));
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(mask, a.s.data() + (r0 + r) * a.ng + g), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) y[(r0 + r) * ldy] = _mm512_reduce_add_ps(acc[r]);
}
#endif  // LOWBIT_X86

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, VNNI = 2 };

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
#ifdef LOWBIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c"))
    names.push_back("avx512_vnni");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    names.push_back("avx2");
#endif
  names.push_back("scalar");
  return names;
}

Isa isa_of(const std::string& name) {
  const auto names = available_isas();
  const std::string chosen = name.empty() ? names.front() : name;
  TORCH_CHECK(std::find(names.begin(), names.end(), chosen) != names.end(), "lowbit: instruction set '", chosen,
              "' is not available on this CPU (available: ", c10::Join(", ", names), ")");
  return chosen == "avx512_vnni" ? VNNI : chosen == "avx2" ? AVX2 : SCALAR;
}

template <int BITS>
void run_rows([[maybe_unused]] Isa isa, const Format& f, const Weight& w, int64_t n, const Act& a, [[maybe_unused]] const void* v,
              float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < a.M; r0 += 4) {
    const int64_t rows = std::min<int64_t>(4, a.M - r0);
#ifdef LOWBIT_X86
    if (isa == VNNI) {
      const auto& l = *static_cast<const Act512*>(v);
      if (vnni_corrections(f)) {
        switch (rows) {
          case 1: rows_vnni<BITS, 1, true>(f, w, n, a, l, r0, y, ldy); break;
          case 2: rows_vnni<BITS, 2, true>(f, w, n, a, l, r0, y, ldy); break;
          case 3: rows_vnni<BITS, 3, true>(f, w, n, a, l, r0, y, ldy); break;
          default: rows_vnni<BITS, 4, true>(f, w, n, a, l, r0, y, ldy);
        }
      } else {
        switch (rows) {
          case 1: rows_vnni<BITS, 1, false>(f, w, n, a, l, r0, y, ldy); break;
          case 2: rows_vnni<BITS, 2, false>(f, w, n, a, l, r0, y, ldy); break;
          case 3: rows_vnni<BITS, 3, false>(f, w, n, a, l, r0, y, ldy); break;
          default: rows_vnni<BITS, 4, false>(f, w, n, a, l, r0, y, ldy);
        }
      }
      continue;
    }
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

}  // namespace

// x (M, K) float/bf16/half; per weight i: codes (N_i, K·bits/8) uint8 or int8, scales (N_i, groups) fp16, mins the
// same or an empty tensor. Returns (M, ΣN_i) in x's dtype: the weights' products side by side.
at::Tensor mm(const at::Tensor& x, const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales,
              const std::vector<at::Tensor>& mins, int64_t bits, bool pairs, bool is_signed, int64_t offset,
              int64_t group_blocks, const std::string& isa_name) {
  const Format f = format_of(bits, pairs, is_signed, offset, group_blocks);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % (BLOCK * group_blocks) == 0, "lowbit: x must be (M, K) with K a multiple of ",
              BLOCK * group_blocks, ", got ", x.sizes());
  TORCH_CHECK(codes.size() == scales.size() && codes.size() == mins.size() && !codes.empty(), "lowbit: one codes, scales and mins per weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "lowbit: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  const Isa isa = isa_of(isa_name);
  std::vector<Weight> weights;
  std::vector<int64_t> starts{0};
  for (size_t i = 0; i < codes.size(); ++i) {
    const int64_t N = codes[i].size(0);
    TORCH_CHECK(codes[i].is_contiguous() && codes[i].element_size() == 1 && codes[i].numel() == N * K * bits / 8,
                "lowbit: weight ", i, ": codes must be contiguous bytes (N, K·bits/8)");
    TORCH_CHECK(scales[i].scalar_type() == at::kHalf && scales[i].is_contiguous() && scales[i].numel() == N * K / BLOCK / group_blocks,
                "lowbit: weight ", i, ": scales must be contiguous fp16 (N, groups)");
    const bool has_min = mins[i].numel() != 0;
    TORCH_CHECK(!has_min || (mins[i].scalar_type() == at::kHalf && mins[i].is_contiguous() && mins[i].numel() == scales[i].numel()),
                "lowbit: weight ", i, ": mins must be like scales, or empty");
    weights.push_back(Weight{static_cast<const uint8_t*>(codes[i].data_ptr()), reinterpret_cast<const uint16_t*>(scales[i].data_ptr()),
                             has_min ? reinterpret_cast<const uint16_t*>(mins[i].data_ptr()) : nullptr, N});
    starts.push_back(starts.back() + N);
  }
  const Act a = quantize_activation(x, f);
#ifdef LOWBIT_X86
  const Act512 v = isa == VNNI ? layout_vnni(a, f) : Act512{};
  const void* layout = &v;
#else
  const void* layout = nullptr;
#endif
  const int64_t N = starts.back();
  const bool fp32 = x.scalar_type() == at::kFloat;
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<float> buffer(fp32 ? 0 : M * N);
  float* out = fp32 ? y.data_ptr<float>() : buffer.data();
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t n = begin; n < end; ++n) {
      while (n >= starts[i + 1]) ++i;
      if (bits == 4) run_rows<4>(isa, f, weights[i], n - starts[i], a, layout, out + n, N);
      else run_rows<8>(isa, f, weights[i], n - starts[i], a, layout, out + n, N);
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
  m.def("mm", &mm, "x @ W.T for low-bit block weights, the activation quantized to int8 per 32-block");
  m.def("quantize_rows", &quantize_rows, "the activation quantization alone (tests)");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs, fastest first");
}
