// Weight-only int8 / int4 matmul for x86 CPUs with AVX2 (and VNNI where the CPU has it): out = x @ W.T.
//
// Plain C++ with a C ABI (no PyTorch headers, so it compiles in seconds); dsvl2/quant/kernels.py builds it
// with flags chosen from the CPU's and calls it through ctypes. The activation rows are quantized to int8 on
// the fly, one scale per block of 32 values (as llama.cpp's q8_0), and each block's integer dot product with
// the weights is converted to float once:
//   int8 weights (one scale per output row):  dot = wscale * sum_b dx_b * sum_i(qw_i * qx_i)
//   int4 weights (w = q * scale + min per group): dot = sum_g scale_g * sum_b(dx_b * sum_i(q_i * qx_i))
//                                                      + sum_g min_g * sum_b(dx_b * sum_i(qx_i))
// so both kernels compute exactly sum_i w_i * (qx_i * dx_i): the error is that of rounding x alone.
//
// Layouts (made once by kernels.py; N padded to a multiple of TILE = 4 rows with zero rows):
//   int8: per tile of 4 rows, [Kp / 32][4][32] int8, Kp = K rounded up to 32 (zero padded); wscale [Np].
//   int4: per tile of 4 rows, [Kp / 64][4][32] bytes, Kp = K rounded up to 64: byte i of a row's 32-byte chunk
//         s holds column 64s + i in its low nibble and 64s + 32 + i in its high nibble (one load, one shift
//         and two ands give two 32-column blocks). scales and mins per tile [K / group][4] float16 (read with
//         F16C: half the bytes of float32, which for groups of 64 was 1 bit per weight).
// x and out: row-major [M][K] and [M][N] in float32 (0), bfloat16 (1) or float16 (2).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

// 0: AVX2 (maddubs + madd); 1: AVX-VNNI; 2: AVX512-VNNI on 256-bit registers (AVX512VL).
#ifndef DSVL2_VNNI
#define DSVL2_VNNI 0
#endif

namespace {

enum { F32 = 0, BF16 = 1, F16 = 2 };

inline float scalar_load(const void* p, int64_t i, int dt) {
  if (dt == F32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (dt == BF16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

inline void scalar_store(void* p, int64_t i, int dt, float f) {
  if (dt == F32) {
    static_cast<float*>(p)[i] = f;
  } else if (dt == BF16) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      u = (u >> 16) | 0x40u;  // NaN stays NaN
    } else {
      u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    }
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(u);
  } else {
    static_cast<uint16_t*>(p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  }
}

inline __m256 load8(const void* p, int64_t i, int dt) {
  if (dt == F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (dt == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of u8 x s8 products in each group of 4 bytes, as 8 int32 lanes.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if DSVL2_VNNI == 1
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#elif DSVL2_VNNI == 2
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// One activation row -> int8 blocks of 32 (qx, scale dx per block) and, when xsum is given, the float sums
// of x per group of `group` columns. Kp (a multiple of 32) >= K; the columns past K are zeros.
void quantize_row(const void* x, int dt, int64_t K, int64_t Kp, int8_t* qx, float* dx, float* xsum, int64_t group) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  if (xsum) std::fill(xsum, xsum + K / group, 0.0f);
  alignas(32) float tmp[32];
  for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
    __m256 v[4];
    if (k0 + 32 <= K) {
      for (int j = 0; j < 4; ++j) v[j] = load8(x, k0 + 8 * j, dt);
    } else {
      for (int j = 0; j < 32; ++j) tmp[j] = k0 + j < K ? scalar_load(x, k0 + j, dt) : 0.0f;
      for (int j = 0; j < 4; ++j) v[j] = _mm256_load_ps(tmp + 8 * j);
    }
    __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                             _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    const float amax = hmax(a);
    dx[k0 / 32] = amax / 127.0f;
    const __m256 mul = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], mul));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], mul));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], mul));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], mul));
    if (xsum && k0 < K) {
      // The sum of the rounded values, not of x: the min term then sees the same activations as the q term,
      // and the rounding errors meet the weights w = q * scale + min, not q * scale (whose common part,
      // about 7.5 * scale, made the int4 error three times the int8 one with exact sums).
      const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      xsum[k0 / group] += hsum(_mm256_cvtepi32_ps(isum)) * (amax / 127.0f);
    }
    i0 = _mm256_packs_epi32(i0, i1);
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qx + k0), _mm256_permutevar8x32_epi32(i0, perm));
  }
}

struct Activations {
  int64_t M, Kp, nb, G;
  std::vector<int8_t> qx;   // [M][Kp]
  std::vector<float> dx;    // [M][nb]
  std::vector<float> xsum;  // [M][G]
};

// Rows rows[0..M) of x (all M rows from 0 when rows is null) quantized into `a`.
void quantize_into(Activations& a, const void* x, int dt, int64_t M, int64_t K, int64_t Kp, int64_t group,
                   const int64_t* rows, int nthreads) {
  a.M = M;
  a.Kp = Kp;
  a.nb = Kp / 32;
  a.G = group ? K / group : 0;
  a.qx.resize(M * Kp);
  a.dx.resize(M * a.nb);
  a.xsum.resize(std::max<int64_t>(M * a.G, 1));
  const size_t row_bytes = static_cast<size_t>(K) * (dt == F32 ? 4 : 2);
  const char* xb = static_cast<const char*>(x);
  // Plain pointers: inside the parallel loop `a` would name each worker thread's own thread_local copy.
  int8_t* qx = a.qx.data();
  float* dx = a.dx.data();
  float* xsum = group ? a.xsum.data() : nullptr;
  const int64_t nb = a.nb, G = a.G;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = rows ? rows[m] : m;
    quantize_row(xb + row * row_bytes, dt, K, Kp, qx + m * Kp, dx + m * nb, xsum ? xsum + m * G : nullptr, group);
  }
}

Activations& quantize(const void* x, int dt, int64_t M, int64_t K, int64_t Kp, int64_t group, int nthreads) {
  static thread_local Activations a;
  quantize_into(a, x, dt, M, K, Kp, group, nullptr, nthreads);
  return a;
}

// Weights are read in one sequential stream: tiles of TILE output rows, their 32-byte chunks interleaved
// (chunk j of rows 0..3, then chunk j + 1 of rows 0..3, ...), with a software prefetch PREFETCH bytes ahead.
// Rows apart in memory were read as TILE short streams that the hardware prefetchers kept restarting: half
// the bandwidth (benchmarks/NOTES_quant_kernels.md).
constexpr int TILE = 4;
constexpr int64_t PREFETCH = 1024;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// The int8 product of one tile (TILE weight rows) with MR activation rows from m0; res[m * TILE + r].
template <int MR>
inline void q8_tile(const int8_t* w, const float* wscale, const Activations& a, int64_t m0, float* res) {
  __m256 acc[TILE][MR];
  for (int r = 0; r < TILE; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const int8_t* qx = a.qx.data() + m0 * a.Kp;
  const float* dx = a.dx.data() + m0 * a.nb;
  for (int64_t b = 0; b < a.nb; ++b) {
    const int8_t* wb = w + b * (TILE * 32);
    prefetch(wb + PREFETCH);
    prefetch(wb + PREFETCH + 64);
    __m256i xv[MR];
    __m256 dv[MR];
    for (int m = 0; m < MR; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * a.Kp + b * 32));
      dv[m] = _mm256_broadcast_ss(dx + m * a.nb + b);
    }
    for (int r = 0; r < TILE; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * 32));
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as unsigned (|-128| reads 128)
      for (int m = 0; m < MR; ++m) {
        const __m256i p = dot_u8s8(aw, _mm256_sign_epi8(xv[m], wv));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < TILE; ++r)
    for (int m = 0; m < MR; ++m) res[m * TILE + r] = hsum(acc[r][m]) * wscale[r];
}

// The int4 product of rows r0..r0+RS of one tile with MR activation rows from m0; res[m * TILE + r].
// scales and mins of the tile are [G][TILE] float16. Per group the block sums collect in accg, then scale once.
template <int RS, int MR>
inline void q4_tile(const uint8_t* w, const uint16_t* scales, const uint16_t* mins, int64_t group, const Activations& a,
                    int64_t m0, int64_t K, int r0, float* res) {
  __m256 acc[RS][MR], accg[RS][MR];
  for (int r = 0; r < RS; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = accg[r][m] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int8_t* qx = a.qx.data() + m0 * a.Kp;
  const float* dx = a.dx.data() + m0 * a.nb;
  const int64_t nb = K / 32, per_group = group / 32;
  for (int64_t s = 0; s * 2 < nb; ++s) {
    const uint8_t* ws = w + s * (TILE * 32);
    if (r0 == 0) {
      prefetch(ws + PREFETCH);
      prefetch(ws + PREFETCH + 64);
    }
    __m256i q[2][RS];
    for (int r = 0; r < RS; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + (r0 + r) * 32));
      q[0][r] = _mm256_and_si256(wv, low4);
      q[1][r] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t b = 2 * s + h;
      if (b >= nb) break;
      for (int m = 0; m < MR; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * a.Kp + b * 32));
        const __m256 dv = _mm256_broadcast_ss(dx + m * a.nb + b);
        for (int r = 0; r < RS; ++r) {
          accg[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q[h][r], xv)), dv, accg[r][m]);
        }
      }
      if ((b + 1) % per_group == 0) {
        const uint16_t* sg = scales + (b / per_group) * TILE + r0;
        for (int r = 0; r < RS; ++r) {
          const __m256 sv = _mm256_set1_ps(_cvtsh_ss(sg[r]));
          for (int m = 0; m < MR; ++m) {
            acc[r][m] = _mm256_fmadd_ps(accg[r][m], sv, acc[r][m]);
            accg[r][m] = _mm256_setzero_ps();
          }
        }
      }
    }
  }
  const int64_t G = a.G;
  for (int m = 0; m < MR; ++m) {
    // The min term of the tile's TILE rows at once: sum_g mins[g][r] * xsum[g].
    const float* xs = a.xsum.data() + (m0 + m) * G;
    __m128 minterm = _mm_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m128 mv = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mins + g * TILE)));
      minterm = _mm_fmadd_ps(mv, _mm_set1_ps(xs[g]), minterm);
    }
    alignas(16) float mt[TILE];
    _mm_store_ps(mt, minterm);
    for (int r = 0; r < RS; ++r) res[m * TILE + r0 + r] = hsum(acc[r][m]) + mt[r0 + r];
  }
}

// Activation rows go in chunks of at most this many while one tile of weight rows stays in cache.
constexpr int64_t M_CHUNK = 64;

// Runs tile(t, m0, mleft, res) -> rows of x done, over every tile and row of x; stores N columns of out.
// Products below this many multiply-adds run on the calling thread: waking the pool costs more than it saves.
constexpr int64_t PARALLEL_WORK = 1 << 18;

template <typename Tile>
void run_tiles(int64_t M, int64_t N, int64_t K, int nthreads, void* out, int odt, Tile tile) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  const bool parallel = M * N * K >= PARALLEL_WORK;
  for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
    const int64_t mend = std::min(M, mc + M_CHUNK);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (parallel)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * TILE;
      const int64_t rows = std::min<int64_t>(TILE, N - n0);
      float res[TILE * 4];
      for (int64_t m0 = mc; m0 < mend;) {
        const int64_t mr = tile(t, m0, mend - m0, res);
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t r = 0; r < rows; ++r) scalar_store(out, (m0 + m) * N + n0 + r, odt, res[m * TILE + r]);
        m0 += mr;
      }
    }
  }
}

// A prepared weight [N][K]: int8 (scales float32 [Np]) or int4 (scales and mins float16 tiles, `group`).
struct Mat {
  int bits;
  const uint8_t* w;
  const void* scales;
  const uint16_t* mins;
  int64_t group, N, K;
  int64_t Kp() const { return bits == 8 ? (K + 31) / 32 * 32 : (K + 63) / 64 * 64; }
  int64_t tiles() const { return (N + TILE - 1) / TILE; }
};

// The product of tile t of `m` with activation rows m0.. of `a` (up to 2 at once): res[row * TILE + r]; returns
// the rows done.
inline int64_t mat_tile(const Mat& m, const Activations& a, int64_t t, int64_t m0, int64_t mleft, float* res) {
  const int64_t Kp = m.Kp();
  if (m.bits == 8) {
    const int8_t* wt = reinterpret_cast<const int8_t*>(m.w) + t * TILE * Kp;
    const float* st = static_cast<const float*>(m.scales) + t * TILE;
    if (mleft >= 2) {
      q8_tile<2>(wt, st, a, m0, res);
      return 2;
    }
    q8_tile<1>(wt, st, a, m0, res);
    return 1;
  }
  const int64_t G = m.K / m.group;
  const uint8_t* wt = m.w + t * TILE * (Kp / 2);
  const uint16_t* st = static_cast<const uint16_t*>(m.scales) + t * TILE * G;
  const uint16_t* mt = m.mins + t * TILE * G;
  if (mleft >= 2) {  // 16 accumulators: some spill to L1, still 8-10% faster than two passes of 2 x 2
    q4_tile<4, 2>(wt, st, mt, m.group, a, m0, m.K, 0, res);
    return 2;
  }
  q4_tile<4, 1>(wt, st, mt, m.group, a, m0, m.K, 0, res);
  return 1;
}

// All rows of `a` against tile t of `m`, stored as float32 into out[row * ld + column].
inline void mat_tile_rows(const Mat& m, const Activations& a, int64_t t, float* out, int64_t ld) {
  float res[TILE * 4];
  const int64_t n0 = t * TILE, rows = std::min<int64_t>(TILE, m.N - n0);
  for (int64_t m0 = 0; m0 < a.M;) {
    const int64_t mr = mat_tile(m, a, t, m0, a.M - m0, res);
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t r = 0; r < rows; ++r) out[(m0 + i) * ld + n0 + r] = res[i * TILE + r];
    m0 += mr;
  }
}

bool valid(const Mat& m) {
  if (m.bits == 8) return m.K > 0;
  return m.bits == 4 && m.K % 32 == 0 && m.group % 32 == 0 && m.group > 0 && m.K % m.group == 0;
}

// One SwiGLU MLP of a MoE layer (a routed expert or the shared experts) over its rows of x, in three steps that
// each run every active MLP's tiles in one parallel loop: gate and up, then down. A decode step of one layer
// then wakes the threads twice instead of three times per expert, and Python is entered once.
struct Job {
  Mat gate, up, down;
  std::vector<int64_t> rows;     // token of each row
  Activations in, mid;           // the rows of x, and silu(gate) * up, as int8 blocks
  std::vector<float> h, act, y;  // [rows][2I] gate | up, [rows][I], [rows][K]
};

// desc: 12 integers per MLP: bits, group, intermediate size, then (weight, scales, mins) of gate, up and down.
constexpr int DESC = 12;

Mat mat_of(const int64_t* d, int which, int64_t N, int64_t K) {
  const int64_t* p = d + 3 + 3 * which;
  return Mat{int(d[0]), reinterpret_cast<const uint8_t*>(p[0]), reinterpret_cast<const void*>(p[1]),
             reinterpret_cast<const uint16_t*>(p[2]), d[1], N, K};
}

// Runs item(i) for i in [0, n) on the pool when the work is worth waking it.
template <typename F>
void parallel_items(int64_t n, int64_t work, int nthreads, F item) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4) if (work >= PARALLEL_WORK)
  for (int64_t i = 0; i < n; ++i) item(i);
}

}  // namespace

extern "C" {

// A version number kernels.py checks, so that a stale cached build is never used.
int dsvl2_qmatmul_abi() { return 5; }

// The tile (TILE rows) kernels.py lays weights out for.
int dsvl2_qmatmul_tile() { return TILE; }

// out [M][N] = x [M][K] @ W.T; w: ceil(N / TILE) tiles of [Kp / 32][TILE][32] int8 (Kp = K rounded up to 32),
// wscale [ceil(N / TILE) * TILE].
int dsvl2_q8_matmul(const void* x, int dt, int64_t M, int64_t K, const int8_t* w, const float* wscale, int64_t N,
                    void* out, int nthreads) {
  const Mat m{8, reinterpret_cast<const uint8_t*>(w), wscale, nullptr, 0, N, K};
  const Activations& a = quantize(x, dt, M, K, m.Kp(), 0, nthreads);
  run_tiles(M, N, K, nthreads, out, dt,
            [&](int64_t t, int64_t m0, int64_t mleft, float* res) { return mat_tile(m, a, t, m0, mleft, res); });
  return 0;
}

// out [M][N] = x [M][K] @ W.T; w: ceil(N / TILE) tiles of [Kp / 64][TILE][32] bytes (Kp = K rounded up to 64;
// see the top of this file for the nibbles), scales and mins: ceil(N / TILE) tiles of [K / group][TILE] float16.
int dsvl2_q4_matmul(const void* x, int dt, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                    const uint16_t* mins, int64_t group, int64_t N, void* out, int nthreads) {
  const Mat m{4, w, scales, mins, group, N, K};
  if (!valid(m)) return 1;
  const Activations& a = quantize(x, dt, M, K, m.Kp(), group, nthreads);
  run_tiles(M, N, K, nthreads, out, dt,
            [&](int64_t t, int64_t m0, int64_t mleft, float* res) { return mat_tile(m, a, t, m0, mleft, res); });
  return 0;
}

// The routed experts that `indices` [M][topk] select (each row's weights in `weights` [M][topk] float32) and the
// shared experts (`shared`: one description, or null) of one MoE layer: out [M][K] = sum over a row's experts of
// weight * mlp(x) + shared(x). `table`: E descriptions (DESC integers each). Returns 1 for a shape the kernels
// do not take, 2 for an expert index outside the table (nothing written then).
int dsvl2_moe(const void* x, int dt, int64_t M, int64_t K, const int64_t* table, int64_t E, const int64_t* shared,
              const int64_t* indices, const float* weights, int64_t topk, void* out, int nthreads) {
  static thread_local std::vector<Job> jobs;
  static thread_local std::vector<int64_t> counts, job_of, slot_job, slot_row;
  counts.assign(E, 0);
  for (int64_t i = 0; i < M * topk; ++i) {
    if (indices[i] < 0 || indices[i] >= E) return 2;
    ++counts[indices[i]];
  }
  // Jobs in expert order, then the shared experts; slot i (row i / topk, choice i % topk) -> (job, row in job).
  job_of.assign(E, -1);
  int64_t n_jobs = 0;
  for (int64_t e = 0; e < E; ++e)
    if (counts[e]) job_of[e] = n_jobs++;
  const int64_t shared_job = shared ? n_jobs++ : -1;
  if (static_cast<int64_t>(jobs.size()) < n_jobs) jobs.resize(n_jobs);
  for (int64_t e = 0; e < E; ++e) {
    if (!counts[e]) continue;
    const int64_t* d = table + e * DESC;
    Job& j = jobs[job_of[e]];
    j.gate = mat_of(d, 0, d[2], K);
    j.up = mat_of(d, 1, d[2], K);
    j.down = mat_of(d, 2, K, d[2]);
    j.rows.clear();
  }
  if (shared) {
    Job& j = jobs[shared_job];
    j.gate = mat_of(shared, 0, shared[2], K);
    j.up = mat_of(shared, 1, shared[2], K);
    j.down = mat_of(shared, 2, K, shared[2]);
    j.rows.resize(M);
    for (int64_t m = 0; m < M; ++m) j.rows[m] = m;
  }
  for (int64_t i = 0; i < n_jobs; ++i)
    if (!valid(jobs[i].gate) || !valid(jobs[i].up) || !valid(jobs[i].down) ||
        jobs[i].gate.bits != jobs[i].up.bits || jobs[i].gate.group != jobs[i].up.group)
      return 1;
  slot_job.resize(M * topk);
  slot_row.resize(M * topk);
  for (int64_t i = 0; i < M * topk; ++i) {
    Job& j = jobs[job_of[indices[i]]];
    slot_job[i] = job_of[indices[i]];
    slot_row[i] = static_cast<int64_t>(j.rows.size());
    j.rows.push_back(i / topk);
  }
  // Plain pointers: inside the parallel loops the thread_local names would be each worker's own copies.
  Job* J = jobs.data();
  const int64_t* sj = slot_job.data();
  const int64_t* sr = slot_row.data();
  // Gate and up of every job, in one loop over (job, matrix, tile).
  std::vector<std::array<int64_t, 3>> items;
  int64_t work = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    Job& j = jobs[i];
    const int64_t rows = static_cast<int64_t>(j.rows.size()), inter = j.gate.N;
    quantize_into(j.in, x, dt, rows, K, j.gate.Kp(), j.gate.bits == 4 ? j.gate.group : 0, j.rows.data(), nthreads);
    j.h.resize(rows * 2 * inter);
    for (int which = 0; which < 2; ++which)
      for (int64_t t = 0; t < j.gate.tiles(); ++t) items.push_back({i, which, t});
    work += rows * 2 * inter * K;
  }
  parallel_items(static_cast<int64_t>(items.size()), work, nthreads, [&](int64_t n) {
    Job& j = J[items[n][0]];
    const int64_t inter = j.gate.N;
    mat_tile_rows(items[n][1] ? j.up : j.gate, j.in, items[n][2], j.h.data() + items[n][1] * inter, 2 * inter);
  });
  // silu(gate) * up, quantized for down; then down of every job in one loop over (job, tile).
  items.clear();
  work = 0;
  for (int64_t i = 0; i < n_jobs; ++i) {
    Job& j = jobs[i];
    const int64_t rows = static_cast<int64_t>(j.rows.size()), inter = j.gate.N;
    j.act.resize(rows * inter);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t n = 0; n < inter; ++n) {
        const float g = j.h[m * 2 * inter + n];
        j.act[m * inter + n] = g / (1.0f + std::exp(-g)) * j.h[m * 2 * inter + inter + n];
      }
    quantize_into(j.mid, j.act.data(), F32, rows, inter, j.down.Kp(), j.down.bits == 4 ? j.down.group : 0, nullptr,
                  nthreads);
    j.y.resize(rows * K);
    for (int64_t t = 0; t < j.down.tiles(); ++t) items.push_back({i, 0, t});
    work += rows * inter * K;
  }
  parallel_items(static_cast<int64_t>(items.size()), work, nthreads, [&](int64_t n) {
    Job& j = J[items[n][0]];
    mat_tile_rows(j.down, j.mid, items[n][2], j.y.data(), K);
  });
  // Each row: its experts' outputs in the order chosen, weighted, then the shared experts', summed in float32.
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K * (topk + 1) >= PARALLEL_WORK)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < K; c += 8) {
      alignas(32) float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t width = std::min<int64_t>(8, K - c);
      for (int64_t s = m * topk; s < (m + 1) * topk; ++s) {
        const float* y = J[sj[s]].y.data() + sr[s] * K + c;
        for (int64_t i = 0; i < width; ++i) acc[i] += weights[s] * y[i];
      }
      if (shared) {
        const float* y = J[shared_job].y.data() + m * K + c;
        for (int64_t i = 0; i < width; ++i) acc[i] += y[i];
      }
      for (int64_t i = 0; i < width; ++i) scalar_store(out, m * K + c + i, dt, acc[i]);
    }
  }
  // Decoding reuses the buffers step after step; a prefill chunk's (tens of MB over 64 experts) are handed back.
  if (M > 64) std::vector<Job>().swap(jobs);
  return 0;
}

// The kernels' layouts from the canonical tensors (kernels.py's to_*_kernel_layout and to_group_tiles do the same
// with PyTorch ops): one pass over the weight, memory-bound, tiles split over the threads for large weights only.
// Rows from N up to the tile's end and columns past K are zeros.

// One thread copies ~10 GB/s; waking a second cost 17-20 ms per call on a loaded 2-core machine (against 0.8 ms
// for 8 MiB on one), and a model has thousands of weights (benchmarks/NOTES_quant_kernels.md).
constexpr int64_t LAYOUT_PARALLEL_BYTES = int64_t(64) << 20;

// int8 [N][K] -> ceil(N / TILE) tiles of [Kp / 32][TILE][32], Kp = K rounded up to 32.
void dsvl2_q8_layout(const int8_t* q, int64_t N, int64_t K, int8_t* out, int nthreads) {
  const int64_t Kp = (K + 31) / 32 * 32, tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= LAYOUT_PARALLEL_BYTES)
  for (int64_t t = 0; t < tiles; ++t) {
    int8_t* o = out + t * TILE * Kp;
    for (int64_t c = 0; c < Kp; c += 32) {
      for (int r = 0; r < TILE; ++r, o += 32) {
        const int64_t n = t * TILE + r, take = n < N ? std::min<int64_t>(32, K - c) : 0;
        if (take > 0) memcpy(o, q + n * K + c, take);
        if (take < 32) memset(o + take, 0, 32 - take);
      }
    }
  }
}

// Canonical int4 [N][K / 2] (column 2j in the low nibble of byte j) -> ceil(N / TILE) tiles of [Kp / 64][TILE][32]
// (byte i of chunk s: column 64s + i low, 64s + 32 + i high), Kp = K rounded up to 64; K a multiple of 32.
// Canonical bytes a = 32s..32s+15 hold columns 64s..64s+31, b = 32s+16..32s+31 the next 32: byte 2j of the chunk
// is lo(a_j) | lo(b_j) << 4, byte 2j + 1 is hi(a_j) | hi(b_j) << 4.
void dsvl2_q4_layout(const uint8_t* q, int64_t N, int64_t K, uint8_t* out, int nthreads) {
  const int64_t half = K / 2, chunks = (K + 63) / 64, tiles = (N + TILE - 1) / TILE;
  const __m128i low4 = _mm_set1_epi8(0x0F), high4 = _mm_set1_epi8(static_cast<char>(0xF0));
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * half >= LAYOUT_PARALLEL_BYTES)
  for (int64_t t = 0; t < tiles; ++t) {
    uint8_t* o = out + t * TILE * chunks * 32;
    for (int64_t s = 0; s < chunks; ++s) {
      for (int r = 0; r < TILE; ++r, o += 32) {
        const int64_t n = t * TILE + r;
        __m128i a = _mm_setzero_si128(), b = _mm_setzero_si128();
        if (n < N) {
          const uint8_t* src = q + n * half + 32 * s;
          a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
          if (32 * s + 32 <= half) b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
        }
        // even: lo(a) | lo(b) << 4; odd: hi(a) | hi(b) << 4 (16-bit shifts, the masks drop the bits that cross).
        const __m128i even = _mm_or_si128(_mm_and_si128(a, low4), _mm_and_si128(_mm_slli_epi16(b, 4), high4));
        const __m128i odd = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), low4), _mm_and_si128(b, high4));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi8(even, odd));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi8(even, odd));
      }
    }
  }
}

// int4 quantization of a float weight [N][K] (float32, bfloat16 or float16; K a multiple of `group`, `group` of
// 32): scheme.py's PyTorch path in one pass instead of a dozen. Per group: min rounded down and
// scale = (max - min) / 15 rounded up to float16 (F16C's directed rounding), then
// q = trunc(w * (1 / scale) + (0.5 - min * (1 / scale))) against those rounded values (0 for a scale of 0), with
// one fma: q can differ from PyTorch's (unfused) at exact ties, where both are half a step away.
void dsvl2_q4_quantize(const void* w, int dt, int64_t N, int64_t K, int64_t group, uint8_t* qweight,
                       uint16_t* scales, uint16_t* mins, int nthreads) {
  const int64_t G = K / group;
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), low_byte = _mm256_set1_epi16(0x00FF);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= LAYOUT_PARALLEL_BYTES)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = n * K + g * group;
      __m256 lo = load8(w, k0, dt), hi = lo;
      for (int64_t i = 8; i < group; i += 8) {
        const __m256 v = load8(w, k0 + i, dt);
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
      }
      const float low = -hmax(_mm256_sub_ps(_mm256_setzero_ps(), lo)), high = hmax(hi);
      const uint16_t low16 = _cvtss_sh(low, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      const float lowr = _cvtsh_ss(low16);
      const uint16_t scale16 = _cvtss_sh((high - lowr) / 15.0f, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
      const float scale = _cvtsh_ss(scale16);
      const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
      const __m256 inv = _mm256_set1_ps(inverse), bias = _mm256_set1_ps(0.5f - lowr * inverse);
      for (int64_t i = 0; i < group; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; ++j) v[j] = _mm256_cvttps_epi32(_mm256_fmadd_ps(load8(w, k0 + i + 8 * j, dt), inv, bias));
        // 32 values 0..15 as bytes in order, then byte pairs (x = q[2j] | q[2j+1] << 8) to q[2j] | q[2j+1] << 4.
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        b = _mm256_permutevar8x32_epi32(b, perm);
        b = _mm256_and_si256(_mm256_or_si256(b, _mm256_srli_epi16(b, 4)), low_byte);
        b = _mm256_permute4x64_epi64(_mm256_packus_epi16(b, b), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qweight + (k0 + i) / 2), _mm256_castsi256_si128(b));
      }
      scales[n * G + g] = scale16;
      mins[n * G + g] = low16;
    }
  }
}

// int8 quantization of a float weight [N][K] (float32, bfloat16 or float16), scheme.py's PyTorch path in one pass
// (the same float32 operations: scale = max |w| / 127, q = round-half-even(w * (1 / max(scale, tiny)))).
void dsvl2_q8_quantize(const void* w, int dt, int64_t N, int64_t K, int8_t* qweight, float* scales, int nthreads) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t K32 = K / 32 * 32;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= LAYOUT_PARALLEL_BYTES)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k0 = n * K;
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i + 8 <= K; i += 8) a = _mm256_max_ps(a, _mm256_and_ps(load8(w, k0 + i, dt), abs_mask));
    float amax = hmax(a);
    for (int64_t i = K / 8 * 8; i < K; ++i) amax = std::max(amax, std::fabs(scalar_load(w, k0 + i, dt)));
    const float scale = amax / 127.0f;
    const float inverse = 1.0f / std::max(scale, std::numeric_limits<float>::min());
    const __m256 inv = _mm256_set1_ps(inverse);
    int8_t* out = qweight + k0;
    for (int64_t i = 0; i < K32; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 x = _mm256_round_ps(_mm256_mul_ps(load8(w, k0 + i + 8 * j, dt), inv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v[j] = _mm256_cvtps_epi32(x);
      }
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(p, perm));
    }
    for (int64_t i = K32; i < K; ++i) out[i] = static_cast<int8_t>(std::nearbyint(scalar_load(w, k0 + i, dt) * inverse));
    scales[n] = scale;
  }
}

// Per-group float16 values [N][G] -> ceil(N / TILE) tiles of [G][TILE] (the tile's rows side by side).
void dsvl2_group_tiles(const uint16_t* v, int64_t N, int64_t G, uint16_t* out, int nthreads) {
  const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (2 * N * G >= LAYOUT_PARALLEL_BYTES)
  for (int64_t t = 0; t < tiles; ++t) {
    uint16_t* o = out + t * TILE * G;
    for (int64_t g = 0; g < G; ++g)
      for (int r = 0; r < TILE; ++r) {
        const int64_t n = t * TILE + r;
        o[g * TILE + r] = n < N ? v[n * G + g] : 0;
      }
  }
}

}  // extern "C"

// A CPython module around the two entry points where Python's headers are there (-DDSVL2_PYTHON): a call costs
// well under a microsecond, against about 8 through ctypes, and a decode step makes hundreds of calls.
// Arguments are plain integers (data pointers included); the GIL is released while the kernel runs.
#ifdef DSVL2_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

bool int_args(PyObject* const* args, Py_ssize_t n, Py_ssize_t want, long long* out) {
  if (n != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, n);
    return false;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

PyObject* py_q8(PyObject*, PyObject* const* args, Py_ssize_t n) {
  long long v[9];
  if (!int_args(args, n, 9, v)) return nullptr;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = dsvl2_q8_matmul(reinterpret_cast<const void*>(v[0]), int(v[1]), v[2], v[3], reinterpret_cast<const int8_t*>(v[4]),
                       reinterpret_cast<const float*>(v[5]), v[6], reinterpret_cast<void*>(v[7]), int(v[8]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

PyObject* py_q4(PyObject*, PyObject* const* args, Py_ssize_t n) {
  long long v[11];
  if (!int_args(args, n, 11, v)) return nullptr;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = dsvl2_q4_matmul(reinterpret_cast<const void*>(v[0]), int(v[1]), v[2], v[3], reinterpret_cast<const uint8_t*>(v[4]),
                       reinterpret_cast<const uint16_t*>(v[5]), reinterpret_cast<const uint16_t*>(v[6]), v[7], v[8],
                       reinterpret_cast<void*>(v[9]), int(v[10]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

PyObject* py_moe(PyObject*, PyObject* const* args, Py_ssize_t n) {
  long long v[12];
  if (!int_args(args, n, 12, v)) return nullptr;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = dsvl2_moe(reinterpret_cast<const void*>(v[0]), int(v[1]), v[2], v[3], reinterpret_cast<const int64_t*>(v[4]), v[5],
                 reinterpret_cast<const int64_t*>(v[6]), reinterpret_cast<const int64_t*>(v[7]),
                 reinterpret_cast<const float*>(v[8]), v[9], reinterpret_cast<void*>(v[10]), int(v[11]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

// The layout conversions: (source pointer, N, K or G, destination pointer, threads); they return None.
template <typename T, void (*F)(const T*, int64_t, int64_t, T*, int)>
PyObject* py_layout(PyObject*, PyObject* const* args, Py_ssize_t n) {
  long long v[5];
  if (!int_args(args, n, 5, v)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  F(reinterpret_cast<const T*>(v[0]), v[1], v[2], reinterpret_cast<T*>(v[3]), int(v[4]));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_q4_quantize(PyObject*, PyObject* const* args, Py_ssize_t n) {
  long long v[9];
  if (!int_args(args, n, 9, v)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  dsvl2_q4_quantize(reinterpret_cast<const void*>(v[0]), int(v[1]), v[2], v[3], v[4], reinterpret_cast<uint8_t*>(v[5]),
                    reinterpret_cast<uint16_t*>(v[6]), reinterpret_cast<uint16_t*>(v[7]), int(v[8]));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_q8_quantize(PyObject*, PyObject* const* args, Py_ssize_t n) {
  long long v[7];
  if (!int_args(args, n, 7, v)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  dsvl2_q8_quantize(reinterpret_cast<const void*>(v[0]), int(v[1]), v[2], v[3], reinterpret_cast<int8_t*>(v[4]),
                    reinterpret_cast<float*>(v[5]), int(v[6]));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_abi(PyObject*, PyObject*) { return PyLong_FromLong(dsvl2_qmatmul_abi()); }
PyObject* py_tile(PyObject*, PyObject*) { return PyLong_FromLong(dsvl2_qmatmul_tile()); }

PyMethodDef methods[] = {
    {"dsvl2_q8_matmul", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_q8)), METH_FASTCALL, nullptr},
    {"dsvl2_q4_matmul", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_q4)), METH_FASTCALL, nullptr},
    {"dsvl2_moe", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_moe)), METH_FASTCALL, nullptr},
    {"dsvl2_q8_layout", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_layout<int8_t, dsvl2_q8_layout>)),
     METH_FASTCALL, nullptr},
    {"dsvl2_q4_layout", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_layout<uint8_t, dsvl2_q4_layout>)),
     METH_FASTCALL, nullptr},
    {"dsvl2_group_tiles",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_layout<uint16_t, dsvl2_group_tiles>)), METH_FASTCALL,
     nullptr},
    {"dsvl2_q4_quantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_q4_quantize)), METH_FASTCALL,
     nullptr},
    {"dsvl2_q8_quantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_q8_quantize)), METH_FASTCALL,
     nullptr},
    {"dsvl2_qmatmul_abi", py_abi, METH_NOARGS, nullptr},
    {"dsvl2_qmatmul_tile", py_tile, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "dsvl2_qmatmul", nullptr, -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_dsvl2_qmatmul(void) { return PyModule_Create(&module); }
#endif
