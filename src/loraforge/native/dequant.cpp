// Fused dequantization of frozen low-bit weights into a dense tile (``quant/native_dequant.py``): what training's
// tiled dequantize-and-matmul (``quant/kernels.py``) decodes twice per layer and step, in one pass per row instead of
// a chain of torch ops, bit-identical to the torch decode of each format:
//   - NF4 / FP4 (bitsandbytes layout): w = table[code] · absmax, first element of a byte in its HIGH nibble;
//   - INTk (k = 2, 3, 4, 8; QA-LoRA): w = scale·q + min, 8 codes per little-endian k-byte word, code j at bit k·j;
//   - GGUF Q4_0 / Q4_1 / Q8_0: w = d·(q − 8), d·q + m, d·q, nibble byte j holding elements j (low) and j+16 (high).
// The product and the sum are rounded separately (never a fused multiply-add: built with -ffp-contract=off and
// written as separate multiply and add instructions), as torch rounds them; a bf16 output is rounded to nearest
// even from the fp32 value, NaN becoming 0xFFFF, as torch's vectorised ``.to(torch.bfloat16)`` does.
// Optionally (fp32 tiles, training's fold: ``adapters/low_rank_linear.py``) a low-rank update is added to each row
// right after it is decoded, while it is in L1: w + s·(b[i] · a), the r-term sum in k order (fused multiply-adds
// in the AVX2 and AVX512 paths, which agree bit for bit; the portable path rounds each product), then scaled and
// added (rounded apart).
// NF4/FP4's double-quantized absmax (``double_quant.py``: map[code]·nested_absmax[i/256] + offset, each step rounded)
// is decoded either on its own (``double_dequantize``) or inside the tile's decode, one value per group as the row
// reaches it (uint8 ``scale``: no separate pass, no (n,) fp32 array per call).
//
// Paths: AVX512 (a 16-entry table lookup is one ``vpermps``), AVX2 (two 8-entry lookups and a blend) and portable
// C++, compiled in this one file with per-function target attributes and chosen by the caller (torch's CPU
// capability, so ``ATEN_CPU_CAPABILITY=avx2`` runs the AVX2 path), so the library runs on any x86-64 and builds
// elsewhere with the portable path. Rows are split over torch's threads (``at::parallel_for``, which needs the OpenMP
// build flag: ``native/__init__.py``).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DEQUANT_X86 1
#endif

namespace {

constexpr int64_t CHUNK = 32;  // elements decoded per step; every format's group is a multiple of it

// How a row's codes are packed; the value is then table[q]·scale (LUT) or scale·(q − offset) [+ min] (affine).
enum Layout : int64_t {
  HIGH_FIRST = 0,  // NF4/FP4: byte j = elements 2j (high nibble), 2j+1 (low)
  LOW_FIRST = 1,   // INT4: byte j = elements 2j (low nibble), 2j+1 (high)
  SPLIT16 = 2,     // GGUF Q4_x: per 16 bytes, byte j = elements j (low nibble), j+16 (high)
  INT2 = 3,        // byte j = elements 4j..4j+3 at bits 0, 2, 4, 6
  INT3 = 4,        // 3 bytes (little-endian) = elements 8j..8j+7 at bits 0, 3, ..., 21
  U8 = 5,          // INT8: one unsigned code per byte
  S8 = 6,          // Q8_0: one signed code per byte
};

constexpr int chunk_bytes(int layout) {
  return layout == INT2 ? 8 : layout == INT3 ? 12 : (layout == U8 || layout == S8) ? 32 : 16;
}

// How a group's scale is stored: fp32 (NF4/FP4 absmax), fp16 (INTk scale, GGUF d), or a double-quantized absmax
// code (uint8: map[code]·nested[i / 256] + offset, i the code's index in the weight's whole absmax array).
enum ScaleKind { SCALE_FP32, SCALE_FP16, SCALE_DOUBLE_QUANT };

struct DoubleQuant {
  const uint8_t* first;  // where index 0 of the absmax codes would be (the tile's codes start at its origin)
  const float* nested;   // (ceil(n / 256),)
  const float* map;      // (256,)
  float offset;
};

constexpr int64_t NESTED = 256;  // absmax values per nested fp32 scale (double_quant.NESTED_BLOCK_SIZE)

struct Spec {
  bool lut;
  float table[16];
  int32_t offset;
  int64_t group;        // elements per scale (and min)
  ScaleKind scale_kind;
  DoubleQuant dq;       // SCALE_DOUBLE_QUANT only
  bool has_min;         // fp16 mins (INTk, Q4_1)
  bool bf16;            // output bf16, else fp32
  int64_t cols;
};

struct Row {
  const uint8_t* codes;
  const void* scale;
  const uint16_t* min;
  void* out;
};

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// The double-quantized absmax whose code is at ``code``, rounded as ``double_dequantize`` rounds it.
inline float double_quant_scale(const DoubleQuant& dq, const uint8_t* code) {
  const float v = dq.map[*code] * dq.nested[(code - dq.first) / NESTED];
  return v + dq.offset;
}

inline float scale_at(const Spec& s, const Row& r, int64_t g) {
  switch (s.scale_kind) {
    case SCALE_FP16: return half_to_float(static_cast<const uint16_t*>(r.scale)[g]);
    case SCALE_DOUBLE_QUANT: return double_quant_scale(s.dq, static_cast<const uint8_t*>(r.scale) + g);
    default: return static_cast<const float*>(r.scale)[g];
  }
}

// fp32 -> bf16 bits, rounded to nearest even; NaN -> 0xFFFF (torch's vectorised conversion)
inline uint16_t to_bf16(float v) {
  if (v != v) return 0xFFFF;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16);
}

// The 32 codes of one chunk, in element order.
template <int L>
inline void unpack_chunk(const uint8_t* p, int32_t* e) {
  if constexpr (L == HIGH_FIRST || L == LOW_FIRST) {
    for (int j = 0; j < 16; ++j) {
      const int hi = p[j] >> 4, lo = p[j] & 15;
      e[2 * j] = L == HIGH_FIRST ? hi : lo;
      e[2 * j + 1] = L == HIGH_FIRST ? lo : hi;
    }
  } else if constexpr (L == SPLIT16) {
    for (int j = 0; j < 16; ++j) {
      e[j] = p[j] & 15;
      e[j + 16] = p[j] >> 4;
    }
  } else if constexpr (L == INT2) {
    for (int j = 0; j < 32; ++j) e[j] = (p[j / 4] >> (2 * (j % 4))) & 3;
  } else if constexpr (L == INT3) {
    for (int w = 0; w < 4; ++w) {
      const uint32_t word = p[3 * w] | (p[3 * w + 1] << 8) | (p[3 * w + 2] << 16);
      for (int j = 0; j < 8; ++j) e[8 * w + j] = (word >> (3 * j)) & 7;
    }
  } else if constexpr (L == U8) {
    for (int j = 0; j < 32; ++j) e[j] = p[j];
  } else {
    for (int j = 0; j < 32; ++j) e[j] = static_cast<int8_t>(p[j]);
  }
}

// ---------------------------------------------------------------- portable
template <int L>
void row_scalar(const Spec& s, const Row& r) {
  int32_t e[CHUNK];
  for (int64_t c = 0; c < s.cols / CHUNK; ++c) {
    const int64_t g = c * CHUNK / s.group;
    const float scale = scale_at(s, r, g);
    const float m = s.has_min ? half_to_float(r.min[g]) : 0.f;
    unpack_chunk<L>(r.codes + c * chunk_bytes(L), e);
    for (int i = 0; i < CHUNK; ++i) {
      float v = s.lut ? s.table[e[i]] * scale : scale * static_cast<float>(e[i] - s.offset);
      if (s.has_min) v = v + m;
      const int64_t at = c * CHUNK + i;
      if (s.bf16) static_cast<uint16_t*>(r.out)[at] = to_bf16(v);
      else static_cast<float*>(r.out)[at] = v;
    }
  }
}

// The low-rank update of NR rows: out[j][c] = out[j][c] + s·Σ_k b[j][k]·a[k][c] for c < cols (a multiple of 32).
struct Fold {
  const float* b;  // (rows, r), row stride b_stride
  const float* a;  // (r, cols), row stride a_stride
  int64_t b_stride, a_stride, r;
  float scale;
};

void fold_scalar(const Fold& f, float* out, int64_t out_stride, const float* b, int64_t nrows, int64_t cols) {
  std::vector<float> acc(cols);
  for (int64_t j = 0; j < nrows; ++j) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k = 0; k < f.r; ++k) {  // k outermost: the column loop is contiguous (and vectorizes), the sum order kept
      const float bk = b[j * f.b_stride + k];
      const float* a = f.a + k * f.a_stride;
      for (int64_t c = 0; c < cols; ++c) acc[c] = acc[c] + bk * a[c];  // rounded apart, no fused multiply-add
    }
    float* o = out + j * out_stride;
    for (int64_t c = 0; c < cols; ++c) o[c] = o[c] + f.scale * acc[c];
  }
}

#ifdef DEQUANT_X86
// The chunk's 32 codes as two 16-byte vectors (elements 0..15, 16..31), one byte each (Q8_0: the signed byte).
// SSE2 only, so it inlines into both the AVX2 and the AVX512 row functions.
template <int L>
inline void unpack_x86(const uint8_t* p, __m128i& e0, __m128i& e1) {
  if constexpr (L == HIGH_FIRST || L == LOW_FIRST || L == SPLIT16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low4 = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(x, low4), hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4);
    if constexpr (L == HIGH_FIRST) {
      e0 = _mm_unpacklo_epi8(hi, lo);
      e1 = _mm_unpackhi_epi8(hi, lo);
    } else if constexpr (L == LOW_FIRST) {
      e0 = _mm_unpacklo_epi8(lo, hi);
      e1 = _mm_unpackhi_epi8(lo, hi);
    } else {
      e0 = lo;
      e1 = hi;
    }
  } else if constexpr (L == U8 || L == S8) {
    e0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    e1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  } else {  // INT2 / INT3: rare formats, unpacked portably
    int32_t e[CHUNK];
    alignas(16) uint8_t bytes[CHUNK];
    unpack_chunk<L>(p, e);
    for (int i = 0; i < CHUNK; ++i) bytes[i] = static_cast<uint8_t>(e[i]);
    e0 = _mm_load_si128(reinterpret_cast<const __m128i*>(bytes));
    e1 = _mm_load_si128(reinterpret_cast<const __m128i*>(bytes + 16));
  }
}

// ---------------------------------------------------------------- AVX2: 8 elements per step
#define AVX2_TARGET __attribute__((target("avx2,f16c")))

// A group's scale and min: fp16 by one F16C instruction (c10::Half's portable conversion costs more than the
// group's 32 decodes), fp32 and double-quantized codes as ``scale_at`` reads them.
template <bool MIN>
AVX2_TARGET inline void group_constants(const Spec& s, const Row& r, int64_t g, float& scale, float& m) {
  scale = s.scale_kind == SCALE_FP16 ? _cvtsh_ss(static_cast<const uint16_t*>(r.scale)[g]) : scale_at(s, r, g);
  m = MIN ? _cvtsh_ss(r.min[g]) : 0.f;
}

template <bool LUT, bool SIGNED, bool MIN, bool BF16>
AVX2_TARGET inline void emit8(__m128i bytes, __m256 tlo, __m256 thi, __m256 scale, __m256 m, __m256i offset, void* out) {
  const __m256i q = SIGNED ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
  __m256 v;
  if constexpr (LUT) {
    const __m256 lo = _mm256_permutevar8x32_ps(tlo, q), hi = _mm256_permutevar8x32_ps(thi, q);
    v = _mm256_mul_ps(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28))), scale);
  } else {
    v = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, offset)));
  }
  if constexpr (MIN) v = _mm256_add_ps(v, m);
  if constexpr (BF16) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128(static_cast<__m128i*>(out), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  } else {
    _mm256_storeu_ps(static_cast<float*>(out), v);
  }
}

template <int L, bool LUT, bool MIN, bool BF16>
AVX2_TARGET void row_avx2(const Spec& s, const Row& r) {
  constexpr bool SIGNED = L == S8;
  constexpr int64_t esize = BF16 ? 2 : 4;
  const __m256 tlo = _mm256_loadu_ps(s.table), thi = _mm256_loadu_ps(s.table + 8);
  const __m256i offset = _mm256_set1_epi32(s.offset);
  const int64_t per_group = s.group / CHUNK;
  char* out = static_cast<char*>(r.out);
  for (int64_t g = 0; g < s.cols / s.group; ++g) {
    float sg, mg;
    group_constants<MIN>(s, r, g, sg, mg);
    const __m256 scale = _mm256_set1_ps(sg), m = _mm256_set1_ps(mg);
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      __m128i e0, e1;
      unpack_x86<L>(r.codes + c * chunk_bytes(L), e0, e1);
      char* o = out + c * CHUNK * esize;
      emit8<LUT, SIGNED, MIN, BF16>(e0, tlo, thi, scale, m, offset, o);
      emit8<LUT, SIGNED, MIN, BF16>(_mm_srli_si128(e0, 8), tlo, thi, scale, m, offset, o + 8 * esize);
      emit8<LUT, SIGNED, MIN, BF16>(e1, tlo, thi, scale, m, offset, o + 16 * esize);
      emit8<LUT, SIGNED, MIN, BF16>(_mm_srli_si128(e1, 8), tlo, thi, scale, m, offset, o + 24 * esize);
    }
  }
}

// NR rows and two vectors of columns at once: each a vector loaded serves NR rows, each b value two vectors.
template <int NR>
__attribute__((target("avx2,fma"))) void fold_avx2_rows(const Fold& f, float* out, int64_t out_stride, const float* b,
                                                       int64_t cols) {
  const __m256 scale = _mm256_set1_ps(f.scale);
  for (int64_t c = 0; c < cols; c += 16) {
    __m256 acc[NR][2];
    for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < f.r; ++k) {
      const float* a = f.a + k * f.a_stride + c;
      const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
      for (int j = 0; j < NR; ++j) {
        const __m256 bj = _mm256_set1_ps(b[j * f.b_stride + k]);
        acc[j][0] = _mm256_fmadd_ps(bj, a0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(bj, a1, acc[j][1]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      for (int h = 0; h < 2; ++h) {
        float* o = out + j * out_stride + c + 8 * h;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_mul_ps(scale, acc[j][h])));
      }
    }
  }
}

void fold_avx2(const Fold& f, float* out, int64_t out_stride, const float* b, int64_t nrows, int64_t cols) {
  for (; nrows >= 4; nrows -= 4, out += 4 * out_stride, b += 4 * f.b_stride) fold_avx2_rows<4>(f, out, out_stride, b, cols);
  for (; nrows > 0; --nrows, out += out_stride, b += f.b_stride) fold_avx2_rows<1>(f, out, out_stride, b, cols);
}

// ---------------------------------------------------------------- AVX512: 16 elements per step
#define AVX512_TARGET __attribute__((target("avx512f,avx2,f16c")))

template <bool LUT, bool SIGNED, bool MIN, bool BF16>
AVX512_TARGET inline void emit16(__m128i bytes, __m512 table, __m512 scale, __m512 m, __m512i offset, void* out) {
  const __m512i q = SIGNED ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  __m512 v = LUT ? _mm512_mul_ps(_mm512_permutexvar_ps(q, table), scale)
                 : _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(q, offset)));
  if constexpr (MIN) v = _mm512_add_ps(v, m);
  if constexpr (BF16) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0xFFFF));
    _mm256_storeu_si256(static_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
  } else {
    _mm512_storeu_ps(out, v);
  }
}

template <int L, bool LUT, bool MIN, bool BF16>
AVX512_TARGET void row_avx512(const Spec& s, const Row& r) {
  constexpr bool SIGNED = L == S8;
  constexpr int64_t esize = BF16 ? 2 : 4;
  const __m512 table = _mm512_loadu_ps(s.table);
  const __m512i offset = _mm512_set1_epi32(s.offset);
  const int64_t per_group = s.group / CHUNK;
  char* out = static_cast<char*>(r.out);
  for (int64_t g = 0; g < s.cols / s.group; ++g) {
    float sg, mg;
    group_constants<MIN>(s, r, g, sg, mg);
    const __m512 scale = _mm512_set1_ps(sg), m = _mm512_set1_ps(mg);
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      __m128i e0, e1;
      unpack_x86<L>(r.codes + c * chunk_bytes(L), e0, e1);
      char* o = out + c * CHUNK * esize;
      emit16<LUT, SIGNED, MIN, BF16>(e0, table, scale, m, offset, o);
      emit16<LUT, SIGNED, MIN, BF16>(e1, table, scale, m, offset, o + 16 * esize);
    }
  }
}
template <int NR>
AVX512_TARGET void fold_avx512_rows(const Fold& f, float* out, int64_t out_stride, const float* b, int64_t cols) {
  const __m512 scale = _mm512_set1_ps(f.scale);
  for (int64_t c = 0; c < cols; c += 32) {
    __m512 acc[NR][2];
    for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < f.r; ++k) {
      const float* a = f.a + k * f.a_stride + c;
      const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
      for (int j = 0; j < NR; ++j) {
        const __m512 bj = _mm512_set1_ps(b[j * f.b_stride + k]);
        acc[j][0] = _mm512_fmadd_ps(bj, a0, acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(bj, a1, acc[j][1]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      for (int h = 0; h < 2; ++h) {
        float* o = out + j * out_stride + c + 16 * h;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_mul_ps(scale, acc[j][h])));
      }
    }
  }
}

void fold_avx512(const Fold& f, float* out, int64_t out_stride, const float* b, int64_t nrows, int64_t cols) {
  for (; nrows >= 4; nrows -= 4, out += 4 * out_stride, b += 4 * f.b_stride) fold_avx512_rows<4>(f, out, out_stride, b, cols);
  for (; nrows > 0; --nrows, out += out_stride, b += f.b_stride) fold_avx512_rows<1>(f, out, out_stride, b, cols);
}
#endif  // DEQUANT_X86

enum Isa { SCALAR, AVX2, AVX512 };

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
#ifdef DEQUANT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f")) names.push_back("avx512");
  if (avx2) names.push_back("avx2");
#endif
  names.push_back("scalar");
  return names;
}

Isa isa_of(const std::string& name) {
  const auto names = available_isas();
  const std::string chosen = name.empty() ? names.front() : name;
  TORCH_CHECK(std::find(names.begin(), names.end(), chosen) != names.end(), "dequant: instruction set '", chosen,
              "' is not available on this CPU (available: ", c10::Join(", ", names), ")");
  return chosen == "avx512" ? AVX512 : chosen == "avx2" ? AVX2 : SCALAR;
}

using RowFn = void (*)(const Spec&, const Row&);
using FoldFn = void (*)(const Fold&, float*, int64_t, const float*, int64_t, int64_t);

FoldFn fold_function([[maybe_unused]] Isa isa) {
#ifdef DEQUANT_X86
  if (isa == AVX512) return &fold_avx512;
  if (isa == AVX2) return &fold_avx2;
#endif
  return &fold_scalar;
}

template <int L, bool LUT, bool MIN, bool BF16>
RowFn pick_isa([[maybe_unused]] Isa isa) {
#ifdef DEQUANT_X86
  if (isa == AVX512) return &row_avx512<L, LUT, MIN, BF16>;
  if (isa == AVX2) return &row_avx2<L, LUT, MIN, BF16>;
#endif
  return &row_scalar<L>;
}

template <int L>
RowFn pick(Isa isa, const Spec& s) {
  if (s.lut) return s.bf16 ? pick_isa<L, true, false, true>(isa) : pick_isa<L, true, false, false>(isa);
  if (s.has_min) return s.bf16 ? pick_isa<L, false, true, true>(isa) : pick_isa<L, false, true, false>(isa);
  return s.bf16 ? pick_isa<L, false, false, true>(isa) : pick_isa<L, false, false, false>(isa);
}

RowFn row_function(int64_t layout, Isa isa, const Spec& s) {
  switch (layout) {
    case HIGH_FIRST: return pick<HIGH_FIRST>(isa, s);
    case LOW_FIRST: return pick<LOW_FIRST>(isa, s);
    case SPLIT16: return pick<SPLIT16>(isa, s);
    case INT2: return pick<INT2>(isa, s);
    case INT3: return pick<INT3>(isa, s);
    case U8: return pick<U8>(isa, s);
    case S8: return pick<S8>(isa, s);
    default: TORCH_CHECK(false, "dequant: unknown code layout ", layout);
  }
}

// The row stride (in elements) of a tensor whose rows are dense past dim 0: (rows, n) or GGUF's (rows, blocks, k).
int64_t row_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && t.stride(-1) == 1 && (t.dim() < 3 || t.stride(1) == t.size(2)) && t.dim() <= 3, "dequant: ",
              name, " must be dense past its first dimension, got sizes ", t.sizes(), " strides ", t.strides());
  return t.dim() == 1 ? 0 : t.stride(0);
}

}  // namespace

// Decode a tile into ``out`` (rows, cols) fp32 or bf16 (any row stride, dense rows): ``codes`` (rows, cols·bits/8)
// uint8/int8 (or GGUF's (rows, blocks, 16|32)), ``scale`` (rows, cols/group) fp32 or fp16, ``min`` the same in fp16 or
// empty, ``table`` (16,) fp32 for NF4/FP4 or empty; ``offset`` is subtracted from affine codes (Q4_0: 8). A uint8
// ``scale`` holds double-quantized absmax codes: a tile of the weight's (n,) codes whose element [0][0] has index
// ``scale_origin``, decoded with ``nested`` (ceil(n / 256),), ``nested_offset`` (one value) and ``nested_map`` (256,),
// all fp32 (otherwise empty). A non-empty ``fold_b`` (rows, r) with ``fold_a`` (r, cols), fp32 with dense rows, adds
// ``fold_scale``·fold_b fold_a (fp32 out only).
void decode(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& min, const at::Tensor& table,
            int64_t layout, int64_t group, int64_t offset, const at::Tensor& out, const std::string& isa_name,
            const at::Tensor& fold_b, const at::Tensor& fold_a, double fold_scale, const at::Tensor& nested,
            const at::Tensor& nested_offset, const at::Tensor& nested_map, int64_t scale_origin) {
  TORCH_CHECK(out.dim() == 2 && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "dequant: out must be a 2-D float32 or bfloat16 tensor, got ", out.sizes(), " ", out.scalar_type());
  const int64_t rows = out.size(0), cols = out.size(1);
  TORCH_CHECK(group % CHUNK == 0 && group > 0 && cols % group == 0, "dequant: group ", group,
              " must be a multiple of 32 dividing the tile's ", cols, " columns");
  TORCH_CHECK(layout >= HIGH_FIRST && layout <= S8, "dequant: unknown code layout ", layout);
  TORCH_CHECK(codes.element_size() == 1 && codes.size(0) == rows && codes.numel() == rows * cols / CHUNK * chunk_bytes(layout),
              "dequant: codes must be bytes (rows, ", cols / CHUNK * chunk_bytes(layout), ") for this tile, got ", codes.sizes());
  const ScaleKind scale_kind = scale.scalar_type() == at::kHalf   ? SCALE_FP16
                               : scale.scalar_type() == at::kByte ? SCALE_DOUBLE_QUANT
                                                                  : SCALE_FP32;
  TORCH_CHECK((scale_kind != SCALE_FP32 || scale.scalar_type() == at::kFloat) && scale.dim() == 2 && scale.size(0) == rows &&
              scale.size(1) == cols / group, "dequant: scale must be fp32, fp16 or uint8 (", rows, ", ", cols / group,
              "), got ", scale.sizes(), " ", scale.scalar_type());
  DoubleQuant dq{};
  if (scale_kind == SCALE_DOUBLE_QUANT) {
    const int64_t last = scale_origin + (rows - 1) * scale.stride(0) + scale.size(1) - 1;  // largest code index read
    TORCH_CHECK(scale_origin >= 0 && scale.stride(1) == 1 && nested.scalar_type() == at::kFloat && nested.is_contiguous() &&
                nested.numel() > last / NESTED, "dequant: double-quantized scale codes need dense rows, an origin >= 0 "
                "and fp32 nested scales covering code ", last, ", got origin ", scale_origin, " and ", nested.numel(),
                " nested scales");
    TORCH_CHECK(nested_offset.scalar_type() == at::kFloat && nested_offset.numel() == 1 && nested_map.scalar_type() == at::kFloat &&
                nested_map.is_contiguous() && nested_map.numel() == 256,
                "dequant: double-quantized scale codes need one fp32 offset and the 256-value fp32 map");
    dq = DoubleQuant{scale.data_ptr<uint8_t>() - scale_origin, nested.data_ptr<float>(), nested_map.data_ptr<float>(),
                     nested_offset.item<float>()};
  }
  const bool has_min = min.numel() != 0;
  TORCH_CHECK(!has_min || (min.scalar_type() == at::kHalf && min.sizes() == scale.sizes()), "dequant: min must be fp16 like scale, or empty");
  const bool lut = table.numel() != 0;
  TORCH_CHECK(!lut || (table.scalar_type() == at::kFloat && table.numel() == 16 && table.is_contiguous() && !has_min),
              "dequant: table must be 16 contiguous fp32 values (and no min)");
  TORCH_CHECK(lut || layout != HIGH_FIRST, "dequant: NF4/FP4 codes need their table");
  const int64_t code_stride = row_stride(codes, "codes"), scale_stride = row_stride(scale, "scale");
  const int64_t min_stride = has_min ? row_stride(min, "min") : 0, out_stride = row_stride(out, "out");
  const bool folds = fold_b.numel() != 0;
  TORCH_CHECK(!folds || (out.scalar_type() == at::kFloat && fold_b.scalar_type() == at::kFloat &&
              fold_a.scalar_type() == at::kFloat && fold_b.dim() == 2 && fold_a.dim() == 2 && fold_b.size(0) == rows &&
              fold_a.size(1) == cols && fold_a.size(0) == fold_b.size(1) && fold_b.stride(1) == 1 && fold_a.stride(1) == 1),
              "dequant: a fold needs an fp32 out, fp32 b (", rows, ", r) and a (r, ", cols, ") with dense rows, got b ",
              fold_b.sizes(), " ", fold_b.scalar_type(), ", a ", fold_a.sizes(), " ", fold_a.scalar_type());
  if (rows == 0 || cols == 0) return;

  Spec s{lut, {}, static_cast<int32_t>(offset), group, scale_kind, dq, has_min, out.scalar_type() == at::kBFloat16, cols};
  if (lut) std::copy_n(table.data_ptr<float>(), 16, s.table);
  const RowFn fn = row_function(layout, isa_of(isa_name), s);
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const auto* sc = static_cast<const char*>(scale.data_ptr());
  const auto* mn = has_min ? reinterpret_cast<const uint16_t*>(min.data_ptr()) : nullptr;
  auto* o = static_cast<char*>(out.data_ptr());
  const int64_t scale_bytes = scale.element_size() * scale_stride, out_bytes = out.element_size() * out_stride;
  const Fold f = folds ? Fold{fold_b.data_ptr<float>(), fold_a.data_ptr<float>(), fold_b.stride(0), fold_a.stride(0),
                               fold_b.size(1), static_cast<float>(fold_scale)}
                        : Fold{};
  const FoldFn fold = fold_function(isa_of(isa_name));
  constexpr int64_t BLOCK = 4;  // rows decoded, then folded while still in L1
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += BLOCK) {
      const int64_t last = std::min(end, first + BLOCK);
      for (int64_t i = first; i < last; ++i) {
        fn(s, Row{c + i * code_stride, sc + i * scale_bytes, mn ? mn + i * min_stride : nullptr, o + i * out_bytes});
      }
      if (folds) fold(f, reinterpret_cast<float*>(o + first * out_bytes), out_stride, f.b + first * f.b_stride,
                      last - first, cols);
    }
  });
}

// The double-quantized absmax: ``(map[codes] · nested_absmax[i / 256]) + offset``, (n,) fp32, each step rounded.
at::Tensor double_dequantize(const at::Tensor& codes, const at::Tensor& nested_absmax, const at::Tensor& offset,
                             const at::Tensor& map) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "dequant: absmax codes must be contiguous uint8");
  const int64_t n = codes.numel();
  TORCH_CHECK(nested_absmax.scalar_type() == at::kFloat && nested_absmax.is_contiguous() && nested_absmax.numel() == (n + NESTED - 1) / NESTED,
              "dequant: nested_absmax must be contiguous fp32 (ceil(n / 256),)");
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.numel() == 1, "dequant: offset must be one fp32 value");
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.is_contiguous() && map.numel() == 256, "dequant: map must be 256 fp32 values");
  at::Tensor out = at::empty({n}, codes.options().dtype(at::kFloat));
  const DoubleQuant dq{codes.data_ptr<uint8_t>(), nested_absmax.data_ptr<float>(), map.data_ptr<float>(), offset.item<float>()};
  float* y = out.data_ptr<float>();
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) y[i] = double_quant_scale(dq, dq.first + i);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "decode a tile of a low-bit weight into out (fp32 or bf16)");
  m.def("double_dequantize", &double_dequantize, "the double-quantized absmax of NF4/FP4, decoded");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs, fastest first");
}
