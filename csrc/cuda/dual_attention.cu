// CUDA kernels of ppd::dual_cross_attention (schemas in csrc/registration.cpp, math in dual_attention.h).
//
// One block per (query tile, head, batch). The block stages the K/V of both segments (Lt text keys
// of batch b % Bt, then Lu user keys of batch b) in shared memory in the input dtype (bf16/fp16 halve
// the tile: 49 KB instead of 99 KB for 81 keys at D=160), one warp per key row so no index is
// divided per element, with a row stride chosen so that a warp reading one column across 32 keys and
// a warp reading one row across 32 head-dim entries both hit 32 distinct 4-byte banks (odd stride
// for fp32, stride = 2 mod 4 elements for 16-bit types). Each warp then owns kRows query rows at a time:
//   scores:  lane j computes q_r . k_j for its keys (j = lane, lane + 32, ...), all kRows rows at once;
//   softmax: two warp-wide max/sum reductions per row, one per segment (keys are few, so the whole
//            row is held in shared memory and the softmax is exact, no online rescaling);
//   output:  lane owns head-dim entries d = lane + 32 t and sums P'_j v_j[d] over both segments,
//            with the user probabilities pre-multiplied by user_scale[b].
// Backward recomputes P from the saved log-sum-exps; the softmax correction rowsum(dO * O_seg) is
// sum_j P_j dP_j over the segment, computed from dP = dO v^T which the gradient needs anyway. dq is
// written per row. dk/dv of the accumulated keys (user keys, plus text keys when text_grads) are
// summed over the block's queries without shared-memory atomics: all warps step through their row
// groups together, and after each step every thread owns distinct (key, d) entries of the block's
// fp32 dk/dv tile and adds the products of all warps' rows to them in a fixed order (a float
// atomicAdd to shared memory from 8 warps on the same addresses serialises, and per-warp copies of
// the tile do not fit beside 81 text keys). Each block then adds its tile to fp32 global
// accumulators with one atomicAdd per element; the order of those atomics across blocks is not
// fixed, so dk/dv are reproducible only to fp32 rounding.
//
// Batch and heads are grid.z and grid.y (at most 65535 each): larger ones are launched in chunks
// with the chunk's first batch/head passed to the kernel.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "dual_attention.h"

namespace ppd::dual_attention {
namespace {

constexpr int kRows = 4;     // query rows a warp processes together
constexpr int kMaxNV = 8;    // head-dim entries per lane: D <= 256
constexpr int kMaxWarps = 8;
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on grid.y and grid.z

struct Tensor4 {
  const void* ptr;
  Strides4 st;
};

struct FwdParams {
  Shapes s;
  float scale;
  Tensor4 q, kt, vt, ku, vu;
  const float* user_scale;
  void* out;
  Strides4 so;
  float* lse_t;
  float* lse_u;
  int rows_per_block;
  int64_t b0, h0;  // first batch / head of this launch (grid.z / grid.y are chunked past 65535)
};

struct BwdParams {
  Shapes s;
  float scale;
  Tensor4 q, kt, vt, ku, vu, go;
  const float* user_scale;
  const float* lse_t;
  const float* lse_u;
  void* dq;
  Strides4 sdq;
  float* dk_text;  // (Bt, H, Lt, D) fp32 accumulators, null without text grads
  float* dv_text;
  float* dk_user;  // (B, H, Lu, D) fp32 accumulators
  float* dv_user;
  float* d_user_scale;  // (B,) fp32 accumulator
  int key0;             // first key whose dk/dv is accumulated: 0 with text grads, else Lt
  int rows_per_block;
  int64_t b0, h0;
};

__device__ inline int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

// Row stride (in elements) of an fp32 tile: odd, so column reads across rows hit distinct banks.
__host__ __device__ inline int smem_stride(int D) { return (D % 2) ? D : D + 1; }
// Row stride of a K/V tile of `elem`-byte elements: odd for 4-byte; for 2-byte, S = 2 mod 4, i.e.
// an odd number of 4-byte words per row (two elements share a word, which a warp reads as a broadcast).
__host__ __device__ inline int kv_stride(int D, int elem) {
  if (elem == 4) return smem_stride(D);
  int S = D;
  while (S % 4 != 2) ++S;
  return S;
}
__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Shared-memory bytes of one block (K/V tiles in the input dtype, everything else fp32); the host
// uses the same formulas to size and check launches, and ppd_engine/ops/dual_attention.py mirrors them.
__host__ __device__ inline int64_t kv_smem_bytes(int64_t Lk, int64_t D, int elem) {
  return align16(2 * Lk * kv_stride(D, elem) * elem);
}
inline int64_t fwd_smem_bytes(int64_t Lk, int64_t D, int warps, int elem) {
  return kv_smem_bytes(Lk, D, elem) + 4 * int64_t(warps) * kRows * (D + Lk);
}
inline int64_t bwd_smem_bytes(int64_t Lk, int64_t Lacc, int64_t D, int warps, int elem) {
  return kv_smem_bytes(Lk, D, elem) + 4 * (2 * Lacc * smem_stride(D) + int64_t(warps) * kRows * (2 * D + 2 * Lk));
}

// Base pointer of the (b, h) slice, taken once per block; ld reads element (l, d) of it as float.
template <typename T>
__device__ inline const T* slice(const Tensor4& t, int64_t b, int64_t h) {
  return static_cast<const T*>(t.ptr) + b * t.st.b + h * t.st.h;
}
template <typename T>
__device__ inline float ld(const T* base, const Strides4& st, int64_t l, int64_t d) {
  return static_cast<float>(base[l * st.l + d * st.d]);
}

__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Stages keys [0, Lt) from the text tensor and [Lt, Lt + Lu) from the user tensor, in T, one warp
// per key row: the source row pointer is computed once per row, lanes step along d.
template <typename T>
__device__ void stage_keys(const Tensor4& text, const Tensor4& user, const Shapes& s, int64_t b, int64_t bt,
                           int64_t h, T* dst, int S) {
  const int Lt = static_cast<int>(s.Lt), Lk = static_cast<int>(s.Lt + s.Lu), D = static_cast<int>(s.D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const T* tb = slice<T>(text, bt, h);
  const T* ub = slice<T>(user, b, h);
  for (int j = warp; j < Lk; j += warps) {
    const bool is_text = j < Lt;
    const T* src = is_text ? tb + int64_t(j) * text.st.l : ub + int64_t(j - Lt) * user.st.l;
    const int64_t sd = is_text ? text.st.d : user.st.d;
    T* row = dst + j * S;
    for (int d = lane; d < D; d += 32) row[d] = src[d * sd];
  }
}

template <typename T, int NV>
__global__ void dual_attn_fwd_kernel(const FwdParams p) {
  extern __shared__ float smem[];
  const Shapes& s = p.s;
  const int64_t b = p.b0 + blockIdx.z, h = p.h0 + blockIdx.y, bt = b % s.Bt;
  const int Lt = static_cast<int>(s.Lt), Lk = static_cast<int>(s.Lt + s.Lu), D = static_cast<int>(s.D);
  const int S = kv_stride(D, sizeof(T));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + Lk * S;
  float* fbase = smem + kv_smem_bytes(Lk, D, sizeof(T)) / 4;
  float* qs = fbase + warp * kRows * (D + Lk);  // kRows x D, this warp's
  float* ps = qs + kRows * D;                   // kRows x Lk, this warp's
  stage_keys<T>(p.kt, p.ku, s, b, bt, h, ks, S);
  stage_keys<T>(p.vt, p.vu, s, b, bt, h, vs, S);
  const T* qb = slice<T>(p.q, b, h);
  __syncthreads();

  const float us = p.user_scale[b];
  const int64_t row0 = int64_t(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = imin64(s.Lq, row0 + p.rows_per_block);
  T* out = static_cast<T*>(p.out);
  for (int64_t g = row0 + int64_t(warp) * kRows; g < row_end; g += int64_t(warps) * kRows) {
    const int n = static_cast<int>(imin64(kRows, row_end - g));
    #pragma unroll
    for (int r = 0; r < kRows; ++r)
      for (int d = lane; d < D; d += 32) qs[r * D + d] = r < n ? ld(qb, p.q.st, g + r, d) * p.scale : 0.f;
    __syncwarp();

    float mt[kRows], mu[kRows];
    #pragma unroll
    for (int r = 0; r < kRows; ++r) mt[r] = mu[r] = -INFINITY;
    for (int j = lane; j < Lk; j += 32) {
      float acc[kRows] = {};
      const T* kr = ks + j * S;
      for (int d = 0; d < D; ++d) {
        const float kv = static_cast<float>(kr[d]);
        #pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] = fmaf(qs[r * D + d], kv, acc[r]);
      }
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        ps[r * Lk + j] = acc[r];
        if (j < Lt) mt[r] = fmaxf(mt[r], acc[r]);
        else mu[r] = fmaxf(mu[r], acc[r]);
      }
    }
    float st[kRows], su[kRows];
    #pragma unroll
    for (int r = 0; r < kRows; ++r) {
      mt[r] = warp_max(mt[r]);
      mu[r] = warp_max(mu[r]);
      st[r] = su[r] = 0.f;
    }
    for (int j = lane; j < Lk; j += 32) {
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool text = j < Lt;
        const float e = __expf(ps[r * Lk + j] - (text ? mt[r] : mu[r]));
        ps[r * Lk + j] = e;
        if (text) st[r] += e;
        else su[r] += e;
      }
    }
    #pragma unroll
    for (int r = 0; r < kRows; ++r) {
      st[r] = warp_sum(st[r]);
      su[r] = warp_sum(su[r]);
    }
    for (int j = lane; j < Lk; j += 32) {
      #pragma unroll
      for (int r = 0; r < kRows; ++r) ps[r * Lk + j] *= j < Lt ? 1.f / st[r] : us / su[r];
    }
    // Constant register indices only (a lane-indexed mt[lane] would put the arrays in local memory).
    #pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (lane == r && r < n) {
        const int64_t i = (b * s.H + h) * s.Lq + g + r;
        p.lse_t[i] = mt[r] + __logf(st[r]);
        p.lse_u[i] = mu[r] + __logf(su[r]);
      }
    }
    __syncwarp();

    float acc[kRows][NV] = {};
    for (int j = 0; j < Lk; ++j) {
      const T* vr = vs + j * S;
      float vv[NV];
      #pragma unroll
      for (int t = 0; t < NV; ++t) vv[t] = (lane + 32 * t < D) ? static_cast<float>(vr[lane + 32 * t]) : 0.f;
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float pj = ps[r * Lk + j];
        #pragma unroll
        for (int t = 0; t < NV; ++t) acc[r][t] = fmaf(pj, vv[t], acc[r][t]);
      }
    }
    #pragma unroll
    for (int r = 0; r < kRows; ++r) {
      #pragma unroll
      for (int t = 0; t < NV; ++t) {
        const int d = lane + 32 * t;
        if (r < n && d < D) out[b * p.so.b + h * p.so.h + (g + r) * p.so.l + d * p.so.d] = static_cast<T>(acc[r][t]);
      }
    }
    __syncwarp();  // qs / ps are rewritten by the next row group
  }
}

template <typename T, int NV>
__global__ void dual_attn_bwd_kernel(const BwdParams p) {
  extern __shared__ float smem[];
  const Shapes& s = p.s;
  const int64_t b = p.b0 + blockIdx.z, h = p.h0 + blockIdx.y, bt = b % s.Bt;
  const int Lt = static_cast<int>(s.Lt), Lk = static_cast<int>(s.Lt + s.Lu), D = static_cast<int>(s.D);
  const int key0 = p.key0, Lacc = Lk - key0;
  const int S = kv_stride(D, sizeof(T)), SF = smem_stride(D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int per_warp = kRows * (2 * D + 2 * Lk);
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + Lk * S;
  float* dks = smem + kv_smem_bytes(Lk, D, sizeof(T)) / 4;  // Lacc x SF
  float* dvs = dks + Lacc * SF;                             // Lacc x SF
  float* wbuf = dvs + Lacc * SF;                            // per-warp buffers, per_warp floats each
  float* qs = wbuf + warp * per_warp;                       // kRows x D: q * scale
  float* gs = qs + kRows * D;                               // kRows x D: grad_out
  float* ps = gs + kRows * D;                               // kRows x Lk: P' (user x scale)
  float* dss = ps + kRows * Lk;                             // kRows x Lk: dP, then dS
  stage_keys<T>(p.kt, p.ku, s, b, bt, h, ks, S);
  stage_keys<T>(p.vt, p.vu, s, b, bt, h, vs, S);
  for (int idx = threadIdx.x; idx < 2 * Lacc * SF; idx += blockDim.x) dks[idx] = 0.f;
  const T* qb = slice<T>(p.q, b, h);
  const T* gb = slice<T>(p.go, b, h);
  __syncthreads();

  const float us = p.user_scale[b];
  const int64_t row0 = int64_t(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = imin64(s.Lq, row0 + p.rows_per_block);
  const int group = warps * kRows;  // rows of one step of all warps
  const int steps = static_cast<int>((row_end - row0 + group - 1) / group);
  T* dq = static_cast<T*>(p.dq);
  float dus = 0.f;  // this warp's share of d user_scale[b] (lane 0's copy is the one added)
  // Every warp runs every step (the __syncthreads below need all of them), idle once its rows run out.
  for (int step = 0; step < steps; ++step) {
    const int64_t g = row0 + int64_t(step) * group + int64_t(warp) * kRows;
    const int n = static_cast<int>(imin64(kRows, row_end - g));  // <= 0: no rows for this warp
    if (n > 0) {
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        for (int d = lane; d < D; d += 32) {
          qs[r * D + d] = r < n ? ld(qb, p.q.st, g + r, d) * p.scale : 0.f;
          gs[r * D + d] = r < n ? ld(gb, p.go.st, g + r, d) : 0.f;
        }
      }
      float lt[kRows], lu[kRows];
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = (b * s.H + h) * s.Lq + g + (r < n ? r : 0);
        lt[r] = p.lse_t[i];
        lu[r] = p.lse_u[i];
      }
      __syncwarp();

      float dt[kRows] = {}, du[kRows] = {};
      for (int j = lane; j < Lk; j += 32) {
        float sc[kRows] = {}, dp[kRows] = {};
        const T* kr = ks + j * S;
        const T* vr = vs + j * S;
        for (int d = 0; d < D; ++d) {
          const float kv = static_cast<float>(kr[d]), vv = static_cast<float>(vr[d]);
          #pragma unroll
          for (int r = 0; r < kRows; ++r) {
            sc[r] = fmaf(qs[r * D + d], kv, sc[r]);
            dp[r] = fmaf(gs[r * D + d], vv, dp[r]);
          }
        }
        const bool text = j < Lt;
        #pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float pr = r < n ? __expf(sc[r] - (text ? lt[r] : lu[r])) : 0.f;
          ps[r * Lk + j] = pr;
          dss[r * Lk + j] = dp[r];
          if (text) dt[r] += pr * dp[r];
          else du[r] += pr * dp[r];
        }
      }
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        dt[r] = warp_sum(dt[r]);
        du[r] = warp_sum(du[r]);
        dus += du[r];  // zero for padding rows (their P is 0)
      }
      for (int j = lane; j < Lk; j += 32) {
        #pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float pr = ps[r * Lk + j], dp = dss[r * Lk + j];
          if (j < Lt) {
            dss[r * Lk + j] = pr * (dp - dt[r]);
          } else {
            dss[r * Lk + j] = us * pr * (dp - du[r]);
            ps[r * Lk + j] = us * pr;
          }
        }
      }
      __syncwarp();

      float acc[kRows][NV] = {};
      for (int j = 0; j < Lk; ++j) {
        const T* kr = ks + j * S;
        float kv[NV];
        #pragma unroll
        for (int t = 0; t < NV; ++t) kv[t] = (lane + 32 * t < D) ? static_cast<float>(kr[lane + 32 * t]) : 0.f;
        #pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float ds = dss[r * Lk + j];
          #pragma unroll
          for (int t = 0; t < NV; ++t) acc[r][t] = fmaf(ds, kv[t], acc[r][t]);
        }
      }
      #pragma unroll
      for (int r = 0; r < kRows; ++r) {
        #pragma unroll
        for (int t = 0; t < NV; ++t) {
          const int d = lane + 32 * t;
          if (r < n && d < D) dq[b * p.sdq.b + h * p.sdq.h + (g + r) * p.sdq.l + d * p.sdq.d] = static_cast<T>(acc[r][t] * p.scale);
        }
      }
    }  // n > 0
    __syncthreads();  // every warp's qs / gs / ps / dss of this step are written
    // dk_j += sum_r dS_rj (scale q_r), dv_j += sum_r P'_rj dO_r over the rows of the warps that had
    // rows this step (padding rows of the last one are zero); each (j, d) has one owner thread.
    const int64_t left = row_end - (row0 + int64_t(step) * group);
    const int active = static_cast<int>(imin64(warps, (left + kRows - 1) / kRows));
    for (int idx = threadIdx.x; idx < Lacc * D; idx += blockDim.x) {
      const int jj = idx / D, d = idx - jj * D, j = jj + key0;
      float ak = 0.f, av = 0.f;
      for (int w = 0; w < active; ++w) {
        const float* wq = wbuf + w * per_warp;
        const float* wg = wq + kRows * D;
        const float* wp = wg + kRows * D;
        const float* wd = wp + kRows * Lk;
        #pragma unroll
        for (int r = 0; r < kRows; ++r) {
          ak = fmaf(wd[r * Lk + j], wq[r * D + d], ak);
          av = fmaf(wp[r * Lk + j], wg[r * D + d], av);
        }
      }
      dks[jj * SF + d] += ak;
      dvs[jj * SF + d] += av;
    }
    __syncthreads();  // the per-warp buffers are rewritten by the next step
  }
  if (lane == 0 && dus != 0.f) atomicAdd(p.d_user_scale + b, dus);
  for (int idx = threadIdx.x; idx < Lacc * D; idx += blockDim.x) {
    const int jj = idx / D, d = idx - jj * D, j = jj + key0;
    const float gk = dks[jj * SF + d], gv = dvs[jj * SF + d];
    if (j < Lt) {
      const int64_t o = ((bt * s.H + h) * s.Lt + j) * s.D + d;
      atomicAdd(p.dk_text + o, gk);
      atomicAdd(p.dv_text + o, gv);
    } else {
      const int64_t o = ((b * s.H + h) * s.Lu + (j - Lt)) * s.D + d;
      atomicAdd(p.dk_user + o, gk);
      atomicAdd(p.dv_user + o, gv);
    }
  }
}

Tensor4 t4(const at::Tensor& t) { return {t.const_data_ptr(), strides_of(t)}; }

int max_smem_optin(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return v;
}

// The most warps per block (8, 4 or 2) whose shared memory fits; fails naming the sizes otherwise.
template <typename F>
int pick_warps(F bytes_for, int limit, const Shapes& s, const char* what) {
  for (int w = kMaxWarps; w >= 2; w /= 2)
    if (bytes_for(w) <= limit) return w;
  TORCH_CHECK(false, "dual_cross_attention (CUDA ", what, "): text length ", s.Lt, " + user length ", s.Lu,
              " keys of head_dim ", s.D, " need ", bytes_for(2),
              " bytes of shared memory, the device allows ", limit,
              "; use the reference path (ppd_engine.ops.dual_attention falls back automatically)");
  return 0;
}

// Rows per block: 4 row groups per warp by default, fewer when that would leave SMs idle.
int pick_rows(const Shapes& s, int warps) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int rows = warps * kRows * 4;
  while (rows > warps * kRows && s.B * s.H * ((s.Lq + rows - 1) / rows) < 2 * sms) rows /= 2;
  return rows;
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Launches over (query tiles, H, B), in chunks of at most 65535 heads / batches (grid.y / grid.z);
// `launch(grid, b0, h0)` launches one chunk.
template <typename F>
void for_grid_chunks(const Shapes& s, int64_t tiles, F&& launch) {
  for (int64_t b0 = 0; b0 < s.B; b0 += kMaxGridYZ) {
    for (int64_t h0 = 0; h0 < s.H; h0 += kMaxGridYZ) {
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(kMaxGridYZ, s.H - h0)),
                      static_cast<unsigned>(std::min(kMaxGridYZ, s.B - b0)));
      launch(grid, b0, h0);
    }
  }
}

int elem_size(at::ScalarType t) { return t == at::kFloat ? 4 : 2; }

#define PPD_DUAL_ATTN_NV_CASES(NV_EXPR, ...)                       \
  switch (NV_EXPR) {                                               \
    case 1: { constexpr int NV = 1; __VA_ARGS__(); break; }        \
    case 2: { constexpr int NV = 2; __VA_ARGS__(); break; }        \
    case 3: { constexpr int NV = 3; __VA_ARGS__(); break; }        \
    case 4: { constexpr int NV = 4; __VA_ARGS__(); break; }        \
    case 5: { constexpr int NV = 5; __VA_ARGS__(); break; }        \
    case 6: { constexpr int NV = 6; __VA_ARGS__(); break; }        \
    case 7: { constexpr int NV = 7; __VA_ARGS__(); break; }        \
    case 8: { constexpr int NV = 8; __VA_ARGS__(); break; }        \
    default: TORCH_CHECK(false, "dual_cross_attention (CUDA): head_dim must be <= ", 32 * kMaxNV); \
  }

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_cross_attention_cuda(const at::Tensor& q, const at::Tensor& k_text,
                                                                         const at::Tensor& v_text,
                                                                         const at::Tensor& k_user,
                                                                         const at::Tensor& v_user,
                                                                         const at::Tensor& user_scale,
                                                                         double softmax_scale) {
  const Shapes s = check_inputs(q, k_text, v_text, k_user, v_user, user_scale);
  TORCH_CHECK(s.D <= 32 * kMaxNV, "dual_cross_attention (CUDA): head_dim ", s.D, " > ", 32 * kMaxNV);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse_t = at::empty({s.B, s.H, s.Lq}, q.options().dtype(at::kFloat));
  at::Tensor lse_u = at::empty({s.B, s.H, s.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse_t, lse_u};
  const at::Tensor us = user_scale.to(at::kFloat).contiguous();
  const int64_t Lk = s.Lt + s.Lu;
  const int elem = elem_size(q.scalar_type());
  const int warps = pick_warps([&](int w) { return fwd_smem_bytes(Lk, s.D, w, elem); },
                               max_smem_optin(q.get_device()), s, "forward");
  const int64_t smem = fwd_smem_bytes(Lk, s.D, warps, elem);
  FwdParams p{s, static_cast<float>(softmax_scale), t4(q), t4(k_text), t4(v_text), t4(k_user), t4(v_user),
              us.const_data_ptr<float>(), out.mutable_data_ptr(), strides_of(out),
              lse_t.mutable_data_ptr<float>(), lse_u.mutable_data_ptr<float>(), pick_rows(s, warps), 0, 0};
  const int64_t tiles = (s.Lq + p.rows_per_block - 1) / p.rows_per_block;
  const auto stream = at::cuda::getCurrentCUDAStream();
  PPD_DUAL_ATTN_DISPATCH(q.scalar_type(), "dual_cross_attention_cuda", [&] {
    using T = scalar_t;
    PPD_DUAL_ATTN_NV_CASES((s.D + 31) / 32, [&] {
      auto kernel = dual_attn_fwd_kernel<T, NV>;
      set_smem(kernel, smem);
      for_grid_chunks(s, tiles, [&](dim3 grid, int64_t b0, int64_t h0) {
        p.b0 = b0;
        p.h0 = h0;
        kernel<<<grid, warps * 32, smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, lse_t, lse_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_cross_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_text, const at::Tensor& v_text,
    const at::Tensor& k_user, const at::Tensor& v_user, const at::Tensor& user_scale, const at::Tensor& lse_text,
    const at::Tensor& lse_user, double softmax_scale, bool text_grads) {
  const Shapes s = check_inputs(q, k_text, v_text, k_user, v_user, user_scale);
  check_backward_extras(s, q, grad_out, lse_text, lse_user);
  TORCH_CHECK(s.D <= 32 * kMaxNV, "dual_cross_attention (CUDA): head_dim ", s.D, " > ", 32 * kMaxNV);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lt = lse_text.contiguous(), lu = lse_user.contiguous();
  const at::Tensor us = user_scale.to(at::kFloat).contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk_user_acc = at::zeros({s.B, s.H, s.Lu, s.D}, f32), dv_user_acc = at::zeros({s.B, s.H, s.Lu, s.D}, f32);
  at::Tensor dk_text_acc, dv_text_acc;
  if (text_grads) {
    dk_text_acc = at::zeros({s.Bt, s.H, s.Lt, s.D}, f32);
    dv_text_acc = at::zeros({s.Bt, s.H, s.Lt, s.D}, f32);
  }
  at::Tensor dus = at::zeros({s.B}, f32);
  // No launch for an empty grid (B, H or Lq zero): a zero grid dimension is an invalid launch.
  if (s.Lq > 0 && s.B > 0 && s.H > 0) {
    const int64_t Lk = s.Lt + s.Lu;
    const int key0 = text_grads ? 0 : static_cast<int>(s.Lt);
    const int elem = elem_size(q.scalar_type());
    const int warps = pick_warps([&](int w) { return bwd_smem_bytes(Lk, Lk - key0, s.D, w, elem); },
                                 max_smem_optin(q.get_device()), s, "backward");
    const int64_t smem = bwd_smem_bytes(Lk, Lk - key0, s.D, warps, elem);
    BwdParams p{s, static_cast<float>(softmax_scale), t4(q), t4(k_text), t4(v_text), t4(k_user), t4(v_user),
                t4(grad_out), us.const_data_ptr<float>(), lt.const_data_ptr<float>(), lu.const_data_ptr<float>(),
                dq.mutable_data_ptr(), strides_of(dq),
                text_grads ? dk_text_acc.mutable_data_ptr<float>() : nullptr,
                text_grads ? dv_text_acc.mutable_data_ptr<float>() : nullptr, dk_user_acc.mutable_data_ptr<float>(),
                dv_user_acc.mutable_data_ptr<float>(), dus.mutable_data_ptr<float>(), key0, pick_rows(s, warps), 0, 0};
    const int64_t tiles = (s.Lq + p.rows_per_block - 1) / p.rows_per_block;
    const auto stream = at::cuda::getCurrentCUDAStream();
    PPD_DUAL_ATTN_DISPATCH(q.scalar_type(), "dual_cross_attention_backward_cuda", [&] {
      using T = scalar_t;
      PPD_DUAL_ATTN_NV_CASES((s.D + 31) / 32, [&] {
        auto kernel = dual_attn_bwd_kernel<T, NV>;
        set_smem(kernel, smem);
        for_grid_chunks(s, tiles, [&](dim3 grid, int64_t b0, int64_t h0) {
          p.b0 = b0;
          p.h0 = h0;
          kernel<<<grid, warps * 32, smem, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  } else {
    dq.zero_();
  }
  at::Tensor dk_user = at::empty_like(k_user), dv_user = at::empty_like(v_user);
  dk_user.copy_(dk_user_acc);
  dv_user.copy_(dv_user_acc);
  at::Tensor dk_text = at::empty({0}, k_text.options()), dv_text = at::empty({0}, v_text.options());
  if (text_grads) {
    dk_text = at::empty_like(k_text);
    dv_text = at::empty_like(v_text);
    dk_text.copy_(dk_text_acc);
    dv_text.copy_(dv_text_acc);
  }
  return {dq, dk_text, dv_text, dk_user, dv_user, dus};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppd, CUDA, m) {
  m.impl("dual_cross_attention", &dual_cross_attention_cuda);
  m.impl("dual_cross_attention_backward", &dual_cross_attention_backward_cuda);
}

}  // namespace ppd::dual_attention
