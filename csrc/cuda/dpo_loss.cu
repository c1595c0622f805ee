// CUDA kernels of the ε-MSE / Diffusion-DPO ops (schemas in csrc/registration.cpp).
//
// Forward, two stages (deterministic: no float atomics):
//   1. sumsq_kernel, grid (rows, chunks): each block reads one chunk of a row of model_pred, ref_pred
//      and target once with 16-byte vector loads, squares the differences in double (sq_diff), sums
//      them per thread in double and reduces the block (warp shuffles) into one double partial per (row, chunk).
//   2. finalize_kernel, one block: adds each row's partials in chunk order, writes the MSEs (float64 for
//      paired_mse, so the losses built on them get the full sums; fp32 for DPO) and, for DPO, `inside`
//      and the mean softplus loss.
// Backward: scaled_diff_kernel, grid (rows, chunks), one elementwise pass; every thread derives its
// row's coefficient from `inside` (a few cached loads) so no extra launch is needed.
// Rows are grid.x (up to 2^31 - 1 samples per call), chunks grid.y (capped at 65535, CUDA's limit;
// a chunk of any length is looped over by its block).
// Double accumulation: the DPO logit multiplies MSE differences by beta/2 (2500 for SD1.5); per-thread
// double sums cost one conversion and one add per element, far below the memory time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "dpo_loss.h"

namespace ppd::dpo {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

__device__ inline double block_sum(double x, double* shared) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    x = lane < (kThreads / 32) ? shared[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;  // valid in thread 0
}

// partial[(row * chunks + c) * 2 + {0, 1}] = sum over the chunk of (m - t)^2, (r - t)^2.
template <typename T, int VEC, bool HAS_REF>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const T* __restrict__ m, const T* __restrict__ r,
                                                         const T* __restrict__ t, int64_t d, int64_t chunk,
                                                         double* __restrict__ partial) {
  const int64_t row = blockIdx.x, c = blockIdx.y;
  const int64_t begin = c * chunk;
  const int64_t end = std::min(d, begin + chunk);
  const int64_t base = row * d;
  double sa = 0.0, sb = 0.0;
  // begin, end and d are multiples of VEC whenever VEC > 1 (checked on the host).
  for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * VEC; j < end; j += static_cast<int64_t>(kThreads) * VEC) {
    const Vec<T, VEC> tv = *reinterpret_cast<const Vec<T, VEC>*>(t + base + j);
    const Vec<T, VEC> mv = *reinterpret_cast<const Vec<T, VEC>*>(m + base + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sa += sq_diff(mv.v[k], tv.v[k]);
    }
    if constexpr (HAS_REF) {
      const Vec<T, VEC> rv = *reinterpret_cast<const Vec<T, VEC>*>(r + base + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sb += sq_diff(rv.v[k], tv.v[k]);
      }
    }
  }
  __shared__ double shared[kThreads / 32];
  sa = block_sum(sa, shared);
  __syncthreads();
  if constexpr (HAS_REF) sb = block_sum(sb, shared);
  if (threadIdx.x == 0) {
    const int64_t idx = (row * gridDim.y + c) * 2;
    partial[idx] = sa;
    partial[idx + 1] = sb;
  }
}

__device__ inline double row_total(const double* partial, int64_t row, int64_t chunks, int which) {
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[(row * chunks + c) * 2 + which];
  return s;
}

// One block. Plain MSE: every row. DPO: every pair, plus the loss.
template <bool DPO, bool HAS_REF, typename MseT>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const double* __restrict__ partial, int64_t n,
                                                            int64_t chunks, double inv_d,
                                                            const float* __restrict__ weight, double beta,
                                                            MseT* __restrict__ model_mse, MseT* __restrict__ ref_mse,
                                                            float* __restrict__ inside, float* __restrict__ loss) {
  if constexpr (!DPO) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      model_mse[i] = static_cast<MseT>(row_total(partial, i, chunks, 0) * inv_d);
      if constexpr (HAS_REF) ref_mse[i] = static_cast<MseT>(row_total(partial, i, chunks, 1) * inv_d);
    }
  } else {
    const int64_t pairs = n / 2;
    double acc = 0.0;
    for (int64_t b = threadIdx.x; b < pairs; b += kThreads) {
      const double em_w = row_total(partial, b, chunks, 0) * inv_d;
      const double er_w = row_total(partial, b, chunks, 1) * inv_d;
      const double em_l = row_total(partial, b + pairs, chunks, 0) * inv_d;
      const double er_l = row_total(partial, b + pairs, chunks, 1) * inv_d;
      const double w = weight != nullptr ? static_cast<double>(weight[b]) : 1.0;
      const double x = pair_inside(em_w, er_w, em_l, er_l, w, beta);
      model_mse[b] = static_cast<float>(em_w);
      model_mse[b + pairs] = static_cast<float>(em_l);
      ref_mse[b] = static_cast<float>(er_w);
      ref_mse[b + pairs] = static_cast<float>(er_l);
      inside[b] = static_cast<float>(x);
      acc += softplus(-x);
    }
    __shared__ double shared[kThreads / 32];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) loss[0] = static_cast<float>(acc / static_cast<double>(pairs));
  }
}

// One block, dpo_loss_ref_mse: the policy sums from the partials, the reference MSEs precomputed (float64).
__global__ void __launch_bounds__(kThreads) finalize_ref_mse_kernel(const double* __restrict__ partial, int64_t n,
                                                                    int64_t chunks, double inv_d,
                                                                    const double* __restrict__ ref_mse,
                                                                    const float* __restrict__ weight, double beta,
                                                                    double* __restrict__ model_mse,
                                                                    float* __restrict__ inside,
                                                                    float* __restrict__ loss) {
  const int64_t pairs = n / 2;
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < pairs; b += kThreads) {
    const double em_w = row_total(partial, b, chunks, 0) * inv_d;
    const double em_l = row_total(partial, b + pairs, chunks, 0) * inv_d;
    const double w = weight != nullptr ? static_cast<double>(weight[b]) : 1.0;
    const double x = pair_inside(em_w, ref_mse[b], em_l, ref_mse[b + pairs], w, beta);
    model_mse[b] = em_w;
    model_mse[b + pairs] = em_l;
    inside[b] = static_cast<float>(x);
    acc += softplus(-x);
  }
  __shared__ double shared[kThreads / 32];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) loss[0] = static_cast<float>(acc / static_cast<double>(pairs));
}

// Coefficient sources of the backward pass: the DPO chain rule, or a plain per-row grad_mse.
struct CoefArgs {
  const float* grad_loss;    // (1,), DPO only
  const float* grad_inside;  // (B,) or null
  const float* grad_mse;     // (n,) or null
  const float* inside;       // (B,), DPO only
  const float* weight;       // (B,) or null
  double beta;
  double scale;  // 2 / D
};

template <bool DPO>
__device__ inline float row_coef(const CoefArgs& a, int64_t row, int64_t n) {
  const double gm = a.grad_mse != nullptr ? static_cast<double>(a.grad_mse[row]) : 0.0;
  if constexpr (!DPO) {
    return static_cast<float>(gm * a.scale);
  } else {
    const int64_t pairs = n / 2;
    const int64_t b = row % pairs;
    const double w = a.weight != nullptr ? static_cast<double>(a.weight[b]) : 1.0;
    const double gi = a.grad_inside != nullptr ? static_cast<double>(a.grad_inside[b]) : 0.0;
    const double c = model_mse_coef(static_cast<double>(a.inside[b]), w, a.beta, static_cast<double>(a.grad_loss[0]),
                                    gi, gm, row < pairs ? -1.0 : 1.0, pairs);
    return static_cast<float>(c * a.scale);
  }
}

template <typename T, int VEC, bool DPO>
__global__ void __launch_bounds__(kThreads) scaled_diff_kernel(const T* __restrict__ p, const T* __restrict__ t,
                                                               T* __restrict__ out, int64_t n, int64_t d,
                                                               int64_t chunk, CoefArgs args) {
  const int64_t row = blockIdx.x;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = std::min(d, begin + chunk);
  const int64_t base = row * d;
  const float k = row_coef<DPO>(args, row, n);
  for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * VEC; j < end; j += static_cast<int64_t>(kThreads) * VEC) {
    const Vec<T, VEC> pv = *reinterpret_cast<const Vec<T, VEC>*>(p + base + j);
    const Vec<T, VEC> tv = *reinterpret_cast<const Vec<T, VEC>*>(t + base + j);
    Vec<T, VEC> ov;
#pragma unroll
    for (int q = 0; q < VEC; ++q) ov.v[q] = static_cast<T>(k * (static_cast<float>(pv.v[q]) - static_cast<float>(tv.v[q])));
    *reinterpret_cast<Vec<T, VEC>*>(out + base + j) = ov;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Chunk length per block: enough blocks to fill the GPU (~8 per SM), at least one vector per thread,
// a multiple of VEC so every chunk start stays 16-byte aligned.
int64_t pick_chunk(int64_t n, int64_t d, int vec) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t target_blocks = static_cast<int64_t>(sms) * 8;
  const int64_t max_chunks = std::clamp<int64_t>((d + kThreads * vec - 1) / (kThreads * vec), 1, 65535);
  const int64_t chunks = std::clamp<int64_t>((target_blocks + n - 1) / n, 1, max_chunks);
  int64_t chunk = (d + chunks - 1) / chunks;
  chunk = (chunk + vec - 1) / vec * vec;
  return chunk;
}

template <typename F>
void dispatch_dtype(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "ppd: unsupported dtype ", t);
  }
}

// Stage 1 for contiguous (n, d) inputs; returns the partial buffer and the chunk count per row.
std::pair<at::Tensor, int64_t> launch_sumsq(const at::Tensor& m, const at::Tensor* r, const at::Tensor& t, Dims dims) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  int64_t chunks = 0;
  dispatch_dtype(m.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec_ok = dims.d % VEC == 0 && aligned16(m.const_data_ptr()) && aligned16(t.const_data_ptr()) &&
                        (r == nullptr || aligned16(r->const_data_ptr()));
    const int vec = vec_ok ? VEC : 1;
    const int64_t chunk = pick_chunk(dims.n, dims.d, vec);
    chunks = (dims.d + chunk - 1) / chunk;
    partial = at::empty({dims.n * chunks * 2}, m.options().dtype(at::kDouble));
    const dim3 grid(static_cast<unsigned>(dims.n), static_cast<unsigned>(chunks));
    const T* pm = m.const_data_ptr<T>();
    const T* pr = r != nullptr ? r->const_data_ptr<T>() : nullptr;
    const T* pt = t.const_data_ptr<T>();
    double* out = partial.data_ptr<double>();
    if (vec_ok) {
      if (r != nullptr) sumsq_kernel<T, VEC, true><<<grid, kThreads, 0, stream>>>(pm, pr, pt, dims.d, chunk, out);
      else sumsq_kernel<T, VEC, false><<<grid, kThreads, 0, stream>>>(pm, pr, pt, dims.d, chunk, out);
    } else {
      if (r != nullptr) sumsq_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(pm, pr, pt, dims.d, chunk, out);
      else sumsq_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(pm, pr, pt, dims.d, chunk, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {partial, chunks};
}

template <bool DPO>
at::Tensor launch_scaled_diff(const at::Tensor& pred, const at::Tensor& target, Dims dims, const CoefArgs& args) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor p = pred.contiguous(), t = target.contiguous();
  at::Tensor out = at::empty(pred.sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec_ok = dims.d % VEC == 0 && aligned16(p.const_data_ptr()) && aligned16(t.const_data_ptr()) &&
                        aligned16(out.data_ptr());
    const int64_t chunk = pick_chunk(dims.n, dims.d, vec_ok ? VEC : 1);
    const dim3 grid(static_cast<unsigned>(dims.n), static_cast<unsigned>((dims.d + chunk - 1) / chunk));
    if (vec_ok) {
      scaled_diff_kernel<T, VEC, DPO><<<grid, kThreads, 0, stream>>>(p.const_data_ptr<T>(), t.const_data_ptr<T>(),
                                                                     out.data_ptr<T>(), dims.n, dims.d, chunk, args);
    } else {
      scaled_diff_kernel<T, 1, DPO><<<grid, kThreads, 0, stream>>>(p.const_data_ptr<T>(), t.const_data_ptr<T>(),
                                                                   out.data_ptr<T>(), dims.n, dims.d, chunk, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// A float32 contiguous copy on the op's device (a no-op for the usual float32 inputs).
at::Tensor f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> paired_mse_cuda(const at::Tensor& model_pred,
                                                   const std::optional<at::Tensor>& ref_pred,
                                                   const at::Tensor& target) {
  const Dims dims = check_pair(model_pred, target, "paired_mse", "model_pred");
  const bool has_ref = ref_pred.has_value();
  if (has_ref) check_pair(*ref_pred, target, "paired_mse", "ref_pred");
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const at::Tensor m = model_pred.contiguous(), t = target.contiguous();
  const at::Tensor r = has_ref ? ref_pred->contiguous() : at::Tensor();
  auto [partial, chunks] = launch_sumsq(m, has_ref ? &r : nullptr, t, dims);
  const auto opts = model_pred.options().dtype(at::kDouble);
  at::Tensor model_mse = at::empty({dims.n}, opts);
  at::Tensor ref_mse = at::empty({has_ref ? dims.n : 0}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double inv_d = 1.0 / static_cast<double>(dims.d);
  if (has_ref) {
    finalize_kernel<false, true, double><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), dims.n, chunks, inv_d, nullptr, 1.0, model_mse.data_ptr<double>(),
        ref_mse.data_ptr<double>(), nullptr, nullptr);
  } else {
    finalize_kernel<false, false, double><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), dims.n, chunks, inv_d, nullptr, 1.0, model_mse.data_ptr<double>(), nullptr,
        nullptr, nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {model_mse, ref_mse};
}

at::Tensor mse_backward_cuda(const at::Tensor& grad_mse, const at::Tensor& pred, const at::Tensor& target) {
  const Dims dims = check_pair(pred, target, "mse_backward", "pred");
  TORCH_CHECK(grad_mse.dim() == 1 && grad_mse.size(0) == dims.n, "mse_backward: grad_mse must have shape (",
              dims.n, ",) for pred shape ", pred.sizes(), ", got ", grad_mse.sizes());
  TORCH_CHECK(grad_mse.device() == pred.device(), "mse_backward: grad_mse is on ", grad_mse.device(),
              " but pred is on ", pred.device());
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::Tensor g = f32(grad_mse);
  CoefArgs args{nullptr, nullptr, g.const_data_ptr<float>(), nullptr, nullptr, 0.0, 2.0 / static_cast<double>(dims.d)};
  return launch_scaled_diff<false>(pred, target, dims, args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cuda(const at::Tensor& model_pred,
                                                                         const at::Tensor& ref_pred,
                                                                         const at::Tensor& target,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         double beta) {
  const Dims dims = check_dpo(model_pred, ref_pred, target, weight, beta, "dpo_loss");
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const int64_t pairs = dims.n / 2;
  const at::Tensor m = model_pred.contiguous(), r = ref_pred.contiguous(), t = target.contiguous();
  auto [partial, chunks] = launch_sumsq(m, &r, t, dims);
  const auto opts = model_pred.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor inside = at::empty({pairs}, opts);
  at::Tensor model_mse = at::empty({dims.n}, opts);
  at::Tensor ref_mse = at::empty({dims.n}, opts);
  const at::Tensor w = weight.has_value() ? f32(*weight) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  finalize_kernel<true, true, float><<<1, kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), dims.n, chunks, 1.0 / static_cast<double>(dims.d),
      w.defined() ? w.const_data_ptr<float>() : nullptr, beta, model_mse.data_ptr<float>(), ref_mse.data_ptr<float>(),
      inside.data_ptr<float>(), loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, inside, model_mse, ref_mse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_ref_mse_cuda(const at::Tensor& model_pred,
                                                                   const at::Tensor& ref_mse,
                                                                   const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   double beta) {
  const Dims dims = check_dpo_ref_mse(model_pred, ref_mse, target, weight, beta, "dpo_loss_ref_mse");
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const at::Tensor m = model_pred.contiguous(), t = target.contiguous(), r = ref_mse.contiguous();
  auto [partial, chunks] = launch_sumsq(m, nullptr, t, dims);
  at::Tensor loss = at::empty({}, model_pred.options().dtype(at::kFloat));
  at::Tensor inside = at::empty({dims.n / 2}, model_pred.options().dtype(at::kFloat));
  at::Tensor model_mse = at::empty({dims.n}, model_pred.options().dtype(at::kDouble));
  const at::Tensor w = weight.has_value() ? f32(*weight) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  finalize_ref_mse_kernel<<<1, kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), dims.n, chunks, 1.0 / static_cast<double>(dims.d), r.const_data_ptr<double>(),
      w.defined() ? w.const_data_ptr<float>() : nullptr, beta, model_mse.data_ptr<double>(), inside.data_ptr<float>(),
      loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, inside, model_mse};
}

at::Tensor dpo_loss_backward_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_inside,
                                  const std::optional<at::Tensor>& grad_model_mse, const at::Tensor& inside,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& model_pred,
                                  const at::Tensor& target, double beta) {
  const Dims dims = check_dpo_backward(grad_loss, grad_inside, grad_model_mse, inside, model_pred, target);
  const int64_t pairs = dims.n / 2;
  for (const at::Tensor* x : {&grad_loss, &inside}) {
    TORCH_CHECK(x->device() == model_pred.device(), "dpo_loss_backward: all tensors must be on ", model_pred.device(),
                ", got one on ", x->device());
  }
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const at::Tensor gl = f32(grad_loss), ins = f32(inside);
  const at::Tensor gi = grad_inside.has_value() ? f32(*grad_inside) : at::Tensor();
  const at::Tensor gm = grad_model_mse.has_value() ? f32(*grad_model_mse) : at::Tensor();
  const at::Tensor w = weight.has_value() ? f32(*weight) : at::Tensor();
  CoefArgs args{gl.const_data_ptr<float>(),
                gi.defined() ? gi.const_data_ptr<float>() : nullptr,
                gm.defined() ? gm.const_data_ptr<float>() : nullptr,
                ins.const_data_ptr<float>(),
                w.defined() ? w.const_data_ptr<float>() : nullptr,
                beta,
                2.0 / static_cast<double>(dims.d)};
  return launch_scaled_diff<true>(model_pred, target, dims, args);
}

}  // namespace
}  // namespace ppd::dpo

TORCH_LIBRARY_IMPL(ppd, CUDA, m) {
  m.impl("paired_mse", &ppd::dpo::paired_mse_cuda);
  m.impl("mse_backward", &ppd::dpo::mse_backward_cuda);
  m.impl("dpo_loss", &ppd::dpo::dpo_loss_cuda);
  m.impl("dpo_loss_ref_mse", &ppd::dpo::dpo_loss_ref_mse_cuda);
  m.impl("dpo_loss_backward", &ppd::dpo::dpo_loss_backward_cuda);
}
