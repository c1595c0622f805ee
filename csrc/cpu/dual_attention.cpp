// CPU kernels of ppd::dual_cross_attention (schemas in csrc/registration.cpp, math in dual_attention.h).
//
// Work items are (b, h, block of query rows), run with at::parallel_for (OpenMP, honours
// torch.set_num_threads). An item first gathers the text and user K/V of its (b, h) into one fp32 tile
// of Lt + Lu keys (converting dtype and resolving strides once), then walks its queries kR rows at a
// time: scores for all keys of both segments in one small GEMM, an exact softmax per segment (a whole
// row of keys fits, so no online rescaling), the user probabilities pre-multiplied by user_scale[b],
// and one more small GEMM against the concatenated V tile gives text + scaled user output directly.
//
// Backward recomputes the probabilities from the saved log-sum-exps. The per-row softmax correction
// rowsum(dO * O_seg) equals sum_j P_j * dP_j over that segment, and dP is computed anyway, so neither
// the output nor the per-branch partial outputs need saving. dk/dv are reduced over queries through
// per-item fp32 partials summed in a fixed order (results do not depend on the thread count).
//
// The micro-kernels work on fixed-size register tiles of GCC vector types; on x86 an AVX2+FMA copy of
// each is compiled next to the portable one and picked once at start-up, since the extension itself
// is built for the baseline ISA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dual_attention.h"

namespace ppd::dual_attention {
namespace {

constexpr int64_t kR = 4;   // query rows per register tile
constexpr int64_t kJ = 16;  // output columns per register tile: two 8-float vectors
constexpr int64_t kPad = 8; // keys and head dims are zero-padded to whole vectors

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// GCC vector types: one 256-bit register in the AVX2 copies, two SSE registers in the portable
// ones. Alignment 4 lets them load from any float address; may_alias lets them view float buffers.
// The helpers taking or returning them are always inlined, so no vector crosses a call boundary
// and GCC's ABI note about AVX vector returns does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi8 __attribute__((vector_size(32), aligned(4), may_alias));

__attribute__((always_inline)) inline vf8 load8(const float* p) { return *reinterpret_cast<const vf8*>(p); }
__attribute__((always_inline)) inline void store8(float* p, vf8 v) { *reinterpret_cast<vf8*>(p) = v; }
__attribute__((always_inline)) inline vf8 splat8(float x) { return vf8{} + x; }

// C[r, n] = sum_k A[r, k] * B[k, n] for kR rows; N a multiple of 8 (B zero-padded up to it).
__attribute__((always_inline)) inline void tile_mm_impl(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                        int64_t K, int64_t N, float* C, int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + kJ <= N; n0 += kJ) {
    vf8 acc[kR][2] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vf8 b0 = load8(B + k * ldb + n0), b1 = load8(B + k * ldb + n0 + 8);
      for (int64_t r = 0; r < kR; ++r) {
        const vf8 a = splat8(A[r * lda + k]);
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
    for (int64_t r = 0; r < kR; ++r) {
      store8(C + r * ldc + n0, acc[r][0]);
      store8(C + r * ldc + n0 + 8, acc[r][1]);
    }
  }
  if (n0 < N) {  // one 8-wide column block left
    vf8 acc[kR] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vf8 b0 = load8(B + k * ldb + n0);
      for (int64_t r = 0; r < kR; ++r) acc[r] += splat8(A[r * lda + k]) * b0;
    }
    for (int64_t r = 0; r < kR; ++r) store8(C + r * ldc + n0, acc[r]);
  }
}

// C[m, n] += sum_r A[r, m] * B[r, n] for kR rows: the rank-kR update that reduces dk/dv over queries.
__attribute__((always_inline)) inline void tile_outer_impl(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                           int64_t M, int64_t N, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
      vf8 acc = load8(C + m * ldc + n0);
      for (int64_t r = 0; r < kR; ++r) acc += splat8(A[r * lda + m]) * load8(B + r * ldb + n0);
      store8(C + m * ldc + n0, acc);
    }
  }
}

// exp on 8 lanes: Cephes expf polynomial with branch-free range reduction (scalar std::exp would
// cost more than the score GEMM for D = 40). Relative error ~2 ulp; inputs below -87.3 give ~1e-38
// instead of 0, negligible next to a softmax maximum of exp(0) = 1. NaN stays NaN.
__attribute__((always_inline)) inline vf8 exp8(vf8 x) {
  const vf8 lo = splat8(-87.3f), hi = splat8(88.3f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (no rounding instruction needed).
  const vf8 t = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - t * 0.693359375f;
  x = x + t * 2.12194440e-4f;
  vf8 p = splat8(1.9875691500e-4f);
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * (x * x) + x + 1.0f;
  const vi8 bits = (__builtin_convertvector(t, vi8) + 127) << 23;
  return p * reinterpret_cast<const vf8&>(bits);
}

__attribute__((always_inline)) inline void exp_inplace_impl(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(x + i, exp8(load8(x + i)));
  if (i < n) {
    float tail[8] = {};
    std::copy(x + i, x + n, tail);
    store8(tail, exp8(load8(tail)));
    std::copy(tail, tail + (n - i), x + i);
  }
}

// Horizontal max / sum of the 8 lanes.
__attribute__((always_inline)) inline float hmax8(vf8 v) {
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, v[l]);
  return m;
}
__attribute__((always_inline)) inline float hsum8(vf8 v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Softmax over x[0, n) in place, times `mul`; returns the log-sum-exp. Eight running maxima and
// sums break the serial dependency chain a scalar loop has (it cost as much as the score GEMM).
__attribute__((always_inline)) inline float softmax_impl(float* x, int64_t n, float mul) {
  const int64_t n8 = n / 8 * 8;
  float m = -INFINITY;
  if (n8) {
    vf8 vm = load8(x);
    for (int64_t j = 8; j < n8; j += 8) {
      const vf8 v = load8(x + j);
      vm = v > vm ? v : vm;
    }
    m = hmax8(vm);
  }
  for (int64_t j = n8; j < n; ++j) m = std::max(m, x[j]);
  for (int64_t j = 0; j < n; ++j) x[j] -= m;
  exp_inplace_impl(x, n);
  vf8 vs = {};
  for (int64_t j = 0; j < n8; j += 8) vs += load8(x + j);
  float sum = hsum8(vs);
  for (int64_t j = n8; j < n; ++j) sum += x[j];
  const float f = mul / sum;
  for (int64_t j = 0; j < n8; j += 8) store8(x + j, load8(x + j) * f);
  for (int64_t j = n8; j < n; ++j) x[j] *= f;
  return m + std::log(sum);
}

// sum_j a[j] * b[j].
__attribute__((always_inline)) inline float dot_impl(const float* a, const float* b, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  vf8 acc = {};
  for (int64_t j = 0; j < n8; j += 8) acc += load8(a + j) * load8(b + j);
  float s = hsum8(acc);
  for (int64_t j = n8; j < n; ++j) s += a[j] * b[j];
  return s;
}

using TileMmFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t);
using ExpFn = void (*)(float*, int64_t);
using SoftmaxFn = float (*)(float*, int64_t, float);
using DotFn = float (*)(const float*, const float*, int64_t);

struct MicroKernels {
  TileMmFn mm;
  TileMmFn outer;
  ExpFn exp;
  SoftmaxFn softmax;
  DotFn dot;
};

void mm_generic(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, int64_t N, float* C,
                int64_t ldc) {
  tile_mm_impl(A, lda, B, ldb, K, N, C, ldc);
}
void outer_generic(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N, float* C,
                   int64_t ldc) {
  tile_outer_impl(A, lda, B, ldb, M, N, C, ldc);
}
void exp_generic(float* x, int64_t n) { exp_inplace_impl(x, n); }
float softmax_generic(float* x, int64_t n, float mul) { return softmax_impl(x, n, mul); }
float dot_generic(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }

#if defined(__x86_64__) && defined(__GNUC__)
#define PPD_DUAL_ATTN_AVX2 1
__attribute__((target("avx2,fma"))) void mm_avx2(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K,
                                                 int64_t N, float* C, int64_t ldc) {
  tile_mm_impl(A, lda, B, ldb, K, N, C, ldc);
}
__attribute__((target("avx2,fma"))) void outer_avx2(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                    int64_t M, int64_t N, float* C, int64_t ldc) {
  tile_outer_impl(A, lda, B, ldb, M, N, C, ldc);
}
__attribute__((target("avx2,fma"))) void exp_avx2(float* x, int64_t n) { exp_inplace_impl(x, n); }
__attribute__((target("avx2,fma"))) float softmax_avx2(float* x, int64_t n, float mul) {
  return softmax_impl(x, n, mul);
}
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  return dot_impl(a, b, n);
}
#endif

const MicroKernels& kernels() {
  static const MicroKernels k = [] {
#ifdef PPD_DUAL_ATTN_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return MicroKernels{mm_avx2, outer_avx2, exp_avx2, softmax_avx2, dot_avx2};
#endif
    return MicroKernels{mm_generic, outer_generic, exp_generic, softmax_generic, dot_generic};
  }();
  return k;
}

// Raw pointers and strides of one call, so the per-item code stays free of Tensor overhead.
template <typename T>
struct Problem {
  Shapes s;
  float scale;
  const T *q, *kt, *vt, *ku, *vu;
  Strides4 sq, skt, svt, sku, svu;
  const float* user_scale;  // (B,) fp32, contiguous
  int64_t Lk, LkP, DP;      // keys of both segments; keys and head dim padded to kPad
};

// Copies key rows of the (b, h) slice of a (., H, L, D) tensor into dst[key0 + j] (row-major,
// ld = DP) or, when transposed, dst[d * ld + key0 + j].
template <typename T>
void gather_keys(const T* base, const Strides4& st, int64_t b, int64_t h, int64_t L, int64_t D, int64_t key0,
                 float* dst, int64_t ld, bool transposed) {
  const T* p = base + b * st.b + h * st.h;
  for (int64_t j = 0; j < L; ++j) {
    const T* row = p + j * st.l;
    if (transposed) {
      for (int64_t d = 0; d < D; ++d) dst[d * ld + key0 + j] = static_cast<float>(row[d * st.d]);
    } else {
      float* out = dst + (key0 + j) * ld;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d * st.d]);
    }
  }
}

// Loads up to kR query-like rows (rows past `n` are zero) into a kR x DP fp32 tile, times `mul`.
template <typename T>
void load_rows(const T* base, const Strides4& st, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t D, float mul,
               float* dst, int64_t DP) {
  std::fill(dst, dst + kR * DP, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    const T* row = base + b * st.b + h * st.h + (i0 + r) * st.l;
    for (int64_t d = 0; d < D; ++d) dst[r * DP + d] = static_cast<float>(row[d * st.d]) * mul;
  }
}

template <typename T>
void store_rows(const float* src, int64_t DP, int64_t n, int64_t D, float mul, T* base, const Strides4& st, int64_t b,
                int64_t h, int64_t i0) {
  for (int64_t r = 0; r < n; ++r) {
    T* row = base + b * st.b + h * st.h + (i0 + r) * st.l;
    for (int64_t d = 0; d < D; ++d) row[d * st.d] = static_cast<T>(src[r * DP + d] * mul);
  }
}

// Query rows per work item: large enough to amortise the K/V gather, small enough to give every
// thread several items.
int64_t rows_per_item(const Shapes& s) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t qb = 128;
  while (qb > 16 && s.B * s.H * ((s.Lq + qb - 1) / qb) < 4 * threads) qb /= 2;
  return qb;
}

template <typename T>
void forward_item(const Problem<T>& P, int64_t b, int64_t h, int64_t i0, int64_t i1, T* out, const Strides4& so,
                  float* lse_t, float* lse_u, std::vector<float>& buf) {
  const auto& s = P.s;
  const auto& mk = kernels();
  const int64_t Lk = P.Lk, LkP = P.LkP, DP = P.DP;
  buf.assign(s.D * LkP + Lk * DP + 2 * kR * DP + kR * LkP, 0.0f);
  float* kt = buf.data();      // D x LkP, keys transposed (columns are keys) for the score tile
  float* v = kt + s.D * LkP;   // Lk x DP
  float* qf = v + Lk * DP;     // kR x DP
  float* of = qf + kR * DP;    // kR x DP
  float* sc = of + kR * DP;    // kR x LkP scores, then probabilities
  const int64_t bt = b % s.Bt;
  gather_keys(P.kt, P.skt, bt, h, s.Lt, s.D, 0, kt, LkP, true);
  gather_keys(P.ku, P.sku, b, h, s.Lu, s.D, s.Lt, kt, LkP, true);
  gather_keys(P.vt, P.svt, bt, h, s.Lt, s.D, 0, v, DP, false);
  gather_keys(P.vu, P.svu, b, h, s.Lu, s.D, s.Lt, v, DP, false);
  const float us = P.user_scale[b];
  const int64_t lse_off = (b * s.H + h) * s.Lq;
  for (int64_t i = i0; i < i1; i += kR) {
    const int64_t n = std::min(kR, i1 - i);
    load_rows(P.q, P.sq, b, h, i, n, s.D, P.scale, qf, DP);
    mk.mm(qf, DP, kt, LkP, s.D, LkP, sc, LkP);
    for (int64_t r = 0; r < n; ++r) {
      float* row = sc + r * LkP;
      lse_t[lse_off + i + r] = mk.softmax(row, s.Lt, 1.0f);
      lse_u[lse_off + i + r] = mk.softmax(row + s.Lt, s.Lu, us);
    }
    // Rows past n hold scores of zero queries; their outputs are computed but never stored.
    mk.mm(sc, LkP, v, DP, Lk, DP, of, DP);
    store_rows(of, DP, n, s.D, 1.0f, out, so, b, h, i);
  }
}

template <typename T>
struct BackwardOut {
  T* dq;
  Strides4 sdq;
  float* dk_part;  // (B, H, items_per_bh, Lacc, D) fp32 partials
  float* dv_part;
  float* dus_part;  // (B, H, items_per_bh)
  int64_t key0;     // first key whose dk/dv is accumulated (0 with text grads, else Lt)
};

template <typename T>
void backward_item(const Problem<T>& P, const T* go, const Strides4& sgo, const float* lse_t, const float* lse_u,
                   int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t item, int64_t items_per_bh,
                   const BackwardOut<T>& O, std::vector<float>& buf) {
  const auto& s = P.s;
  const auto& mk = kernels();
  const int64_t Lk = P.Lk, LkP = P.LkP, DP = P.DP;
  const int64_t Lacc = Lk - O.key0;
  buf.assign(2 * s.D * LkP + Lk * DP + 3 * kR * DP + 2 * kR * LkP + 2 * Lacc * DP, 0.0f);
  float* kt = buf.data();       // D x LkP
  float* vt = kt + s.D * LkP;   // D x LkP
  float* k = vt + s.D * LkP;    // Lk x DP
  float* qf = k + Lk * DP;      // kR x DP, q * softmax_scale
  float* gf = qf + kR * DP;     // kR x DP, grad_out
  float* dqf = gf + kR * DP;    // kR x DP
  float* sc = dqf + kR * DP;    // kR x LkP: scores -> probabilities (user ones times user_scale)
  float* dp = sc + kR * LkP;    // kR x LkP: dO v^T -> dS
  float* dk = dp + kR * LkP;    // Lacc x DP
  float* dv = dk + Lacc * DP;   // Lacc x DP
  const int64_t bt = b % s.Bt;
  gather_keys(P.kt, P.skt, bt, h, s.Lt, s.D, 0, kt, LkP, true);
  gather_keys(P.ku, P.sku, b, h, s.Lu, s.D, s.Lt, kt, LkP, true);
  gather_keys(P.vt, P.svt, bt, h, s.Lt, s.D, 0, vt, LkP, true);
  gather_keys(P.vu, P.svu, b, h, s.Lu, s.D, s.Lt, vt, LkP, true);
  gather_keys(P.kt, P.skt, bt, h, s.Lt, s.D, 0, k, DP, false);
  gather_keys(P.ku, P.sku, b, h, s.Lu, s.D, s.Lt, k, DP, false);
  const float us = P.user_scale[b];
  const int64_t lse_off = (b * s.H + h) * s.Lq;
  double dus = 0.0;
  for (int64_t i = i0; i < i1; i += kR) {
    const int64_t n = std::min(kR, i1 - i);
    load_rows(P.q, P.sq, b, h, i, n, s.D, P.scale, qf, DP);
    load_rows(go, sgo, b, h, i, n, s.D, 1.0f, gf, DP);
    mk.mm(qf, DP, kt, LkP, s.D, LkP, sc, LkP);
    mk.mm(gf, DP, vt, LkP, s.D, LkP, dp, LkP);
    for (int64_t r = 0; r < kR; ++r) {
      float* p = sc + r * LkP;
      float* g = dp + r * LkP;
      if (r >= n) {  // padding rows must not leak into the dk/dv reductions
        std::fill(p, p + LkP, 0.0f);
        std::fill(g, g + LkP, 0.0f);
        continue;
      }
      const float lt = lse_t[lse_off + i + r], lu = lse_u[lse_off + i + r];
      for (int64_t j = 0; j < s.Lt; ++j) p[j] -= lt;
      for (int64_t j = s.Lt; j < Lk; ++j) p[j] -= lu;
      mk.exp(p, Lk);
      // rowsum(dO * O_seg) = sum_j P_j dP_j over the segment (O_seg = P_seg V_seg).
      const float dt = mk.dot(p, g, s.Lt), du = mk.dot(p + s.Lt, g + s.Lt, s.Lu);
      for (int64_t j = 0; j < s.Lt; ++j) g[j] = p[j] * (g[j] - dt);
      for (int64_t j = s.Lt; j < Lk; ++j) {
        g[j] = us * p[j] * (g[j] - du);
        p[j] *= us;
      }
      std::fill(p + Lk, p + LkP, 0.0f);
      std::fill(g + Lk, g + LkP, 0.0f);
      dus += du;
    }
    mk.mm(dp, LkP, k, DP, Lk, DP, dqf, DP);
    store_rows(dqf, DP, n, s.D, P.scale, O.dq, O.sdq, b, h, i);
    // dk_j += dS_ij * (s q_i), dv_j += P'_ij dO_i over the accumulated keys.
    mk.outer(dp + O.key0, LkP, qf, DP, Lacc, DP, dk, DP);
    mk.outer(sc + O.key0, LkP, gf, DP, Lacc, DP, dv, DP);
  }
  const int64_t part = (b * s.H + h) * items_per_bh + item;
  float* dkp = O.dk_part + part * Lacc * s.D;
  float* dvp = O.dv_part + part * Lacc * s.D;
  for (int64_t j = 0; j < Lacc; ++j) {
    std::copy(dk + j * DP, dk + j * DP + s.D, dkp + j * s.D);
    std::copy(dv + j * DP, dv + j * DP + s.D, dvp + j * s.D);
  }
  O.dus_part[part] = static_cast<float>(dus);
}

template <typename T>
Problem<T> make_problem(const Shapes& s, double scale, const at::Tensor& q, const at::Tensor& kt, const at::Tensor& vt,
                        const at::Tensor& ku, const at::Tensor& vu, const at::Tensor& us) {
  Problem<T> P;
  P.s = s;
  P.scale = static_cast<float>(scale);
  P.q = q.const_data_ptr<T>();
  P.kt = kt.const_data_ptr<T>();
  P.vt = vt.const_data_ptr<T>();
  P.ku = ku.const_data_ptr<T>();
  P.vu = vu.const_data_ptr<T>();
  P.sq = strides_of(q);
  P.skt = strides_of(kt);
  P.svt = strides_of(vt);
  P.sku = strides_of(ku);
  P.svu = strides_of(vu);
  P.user_scale = us.const_data_ptr<float>();
  P.Lk = s.Lt + s.Lu;
  P.LkP = round_up(P.Lk, kPad);
  P.DP = round_up(s.D, kPad);
  return P;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_cross_attention_cpu(const at::Tensor& q, const at::Tensor& k_text,
                                                                        const at::Tensor& v_text,
                                                                        const at::Tensor& k_user,
                                                                        const at::Tensor& v_user,
                                                                        const at::Tensor& user_scale,
                                                                        double softmax_scale) {
  const Shapes s = check_inputs(q, k_text, v_text, k_user, v_user, user_scale);
  // empty_like keeps q's memory layout, so a transposed (B, L, H, D) view gives an output that
  // reshapes back to (B, L, H*D) for free.
  at::Tensor out = at::empty_like(q);
  at::Tensor lse_t = at::empty({s.B, s.H, s.Lq}, q.options().dtype(at::kFloat));
  at::Tensor lse_u = at::empty({s.B, s.H, s.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse_t, lse_u};
  const at::Tensor us = user_scale.to(at::kFloat).contiguous();
  const int64_t qb = rows_per_item(s);
  const int64_t items_per_bh = (s.Lq + qb - 1) / qb;
  PPD_DUAL_ATTN_DISPATCH(q.scalar_type(), "dual_cross_attention_cpu", [&] {
    const auto P = make_problem<scalar_t>(s, softmax_scale, q, k_text, v_text, k_user, v_user, us);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Strides4 so = strides_of(out);
    float* lt = lse_t.mutable_data_ptr<float>();
    float* lu = lse_u.mutable_data_ptr<float>();
    at::parallel_for(0, s.B * s.H * items_per_bh, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t w = begin; w < end; ++w) {
        const int64_t item = w % items_per_bh, bh = w / items_per_bh;
        const int64_t i0 = item * qb, i1 = std::min(s.Lq, i0 + qb);
        forward_item(P, bh / s.H, bh % s.H, i0, i1, o, so, lt, lu, buf);
      }
    });
  });
  return {out, lse_t, lse_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_cross_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_text, const at::Tensor& v_text,
    const at::Tensor& k_user, const at::Tensor& v_user, const at::Tensor& user_scale, const at::Tensor& lse_text,
    const at::Tensor& lse_user, double softmax_scale, bool text_grads) {
  const Shapes s = check_inputs(q, k_text, v_text, k_user, v_user, user_scale);
  check_backward_extras(s, q, grad_out, lse_text, lse_user);
  const at::Tensor lt = lse_text.contiguous(), lu = lse_user.contiguous();
  const at::Tensor us = user_scale.to(at::kFloat).contiguous();
  const int64_t qb = rows_per_item(s);
  const int64_t items_per_bh = std::max<int64_t>(1, (s.Lq + qb - 1) / qb);
  const int64_t key0 = text_grads ? 0 : s.Lt;
  const int64_t Lacc = s.Lt + s.Lu - key0;
  at::Tensor dq = at::empty_like(q);
  auto f32 = q.options().dtype(at::kFloat);
  // Items with no queries leave their partials at zero, hence zeros rather than empty.
  at::Tensor dk_part = at::zeros({s.B, s.H, items_per_bh, Lacc, s.D}, f32);
  at::Tensor dv_part = at::zeros({s.B, s.H, items_per_bh, Lacc, s.D}, f32);
  at::Tensor dus_part = at::zeros({s.B, s.H, items_per_bh}, f32);
  if (s.Lq > 0) {
    PPD_DUAL_ATTN_DISPATCH(q.scalar_type(), "dual_cross_attention_backward_cpu", [&] {
      const auto P = make_problem<scalar_t>(s, softmax_scale, q, k_text, v_text, k_user, v_user, us);
      BackwardOut<scalar_t> O{dq.mutable_data_ptr<scalar_t>(), strides_of(dq), dk_part.mutable_data_ptr<float>(),
                              dv_part.mutable_data_ptr<float>(), dus_part.mutable_data_ptr<float>(), key0};
      const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
      const Strides4 sgo = strides_of(grad_out);
      const float* plt = lt.const_data_ptr<float>();
      const float* plu = lu.const_data_ptr<float>();
      at::parallel_for(0, s.B * s.H * items_per_bh, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buf;
        for (int64_t w = begin; w < end; ++w) {
          const int64_t item = w % items_per_bh, bh = w / items_per_bh;
          const int64_t i0 = item * qb, i1 = std::min(s.Lq, i0 + qb);
          if (i0 >= i1) continue;
          backward_item(P, go, sgo, plt, plu, bh / s.H, bh % s.H, i0, i1, item, items_per_bh, O, buf);
        }
      });
    });
  }
  const at::Tensor dk_acc = dk_part.sum(2), dv_acc = dv_part.sum(2);  // (B, H, Lacc, D)
  at::Tensor dk_user = at::empty_like(k_user), dv_user = at::empty_like(v_user);
  dk_user.copy_(dk_acc.narrow(2, Lacc - s.Lu, s.Lu));
  dv_user.copy_(dv_acc.narrow(2, Lacc - s.Lu, s.Lu));
  at::Tensor dk_text = at::empty({0}, k_text.options()), dv_text = at::empty({0}, v_text.options());
  if (text_grads) {
    // Query batch b used text batch b % Bt: fold (B/Bt, Bt) and sum the repeats.
    auto fold = [&](const at::Tensor& acc) {
      return acc.narrow(2, 0, s.Lt).reshape({s.B / s.Bt, s.Bt, s.H, s.Lt, s.D}).sum(0);
    };
    dk_text = at::empty_like(k_text);
    dv_text = at::empty_like(v_text);
    dk_text.copy_(fold(dk_acc));
    dv_text.copy_(fold(dv_acc));
  }
  at::Tensor d_user_scale = dus_part.sum({1, 2});
  return {dq, dk_text, dv_text, dk_user, dv_user, d_user_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppd, CPU, m) {
  m.impl("dual_cross_attention", &dual_cross_attention_cpu);
  m.impl("dual_cross_attention_backward", &dual_cross_attention_backward_cpu);
}

}  // namespace ppd::dual_attention
