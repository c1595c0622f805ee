// CPU kernels of the ε-MSE / Diffusion-DPO ops (schemas in csrc/registration.cpp).
//
// Forward: one pass over model_pred, ref_pred and target computes both per-sample sums of squares.
// Work is split into (row, chunk) items run with at::parallel_for (OpenMP in PyTorch builds, so it
// honours torch.set_num_threads); each item writes its own double partial and the partials are added
// in a fixed order, so results do not depend on the thread count.
// Backward: one elementwise pass, grad = coef[row] * 2 (pred - target) / D.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dpo_loss.h"

namespace ppd::dpo {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kChunk = 1 << 15;          // elements of one row handled by one parallel work item
constexpr int64_t kMinPerThread = 1 << 16;   // fewer elements per thread run inline: a thread-pool
                                             // hand-off (and, on a busy machine, a barrier) costs more

// Work items per thread so that each thread gets at least kMinPerThread elements.
int64_t grain_items(int64_t d) {
  const int64_t per_item = std::min(d, kChunk);
  return std::max<int64_t>(1, (kMinPerThread + per_item - 1) / per_item);
}

// Sum of (a - t)^2 and, when HAS_REF, (b - t)^2 over n contiguous elements (see sq_diff), squared and
// summed in double lanes: the DPO logit multiplies
// MSE differences by beta/2 (2500 for SD1.5), so an fp32 running sum's error would show in the loss.
// Independent lanes let the compiler vectorise without reassociating one sum.
template <typename T, bool HAS_REF>
[[gnu::always_inline]] inline void sumsq_range(const T* a, const T* b, const T* t, int64_t n, double& out_a,
                                               double& out_b) {
  double acc_a[kLanes] = {};
  double acc_b[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc_a[l] += sq_diff(a[j + l], t[j + l]);
      if constexpr (HAS_REF) acc_b[l] += sq_diff(b[j + l], t[j + l]);
    }
  }
  for (; j < n; ++j) {
    acc_a[j % kLanes] += sq_diff(a[j], t[j]);
    if constexpr (HAS_REF) acc_b[j % kLanes] += sq_diff(b[j], t[j]);
  }
  double sa = 0.0, sb = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    sa += acc_a[l];
    sb += acc_b[l];
  }
  out_a = sa;
  out_b = sb;
}

// The hot loop, compiled twice: AVX2+FMA (4 doubles / 8 floats per instruction) and the baseline
// x86-64 ISA the extension is built for; the loader picks one for the running CPU (GCC ifunc).
#define PPD_SUMSQ_CLONE(NAME, T, HAS_REF)                                                               \
  __attribute__((target_clones("arch=haswell", "default"))) void NAME(const T* a, const T* b, const T* t,  \
                                                                      int64_t n, double& sa, double& sb) { \
    sumsq_range<T, HAS_REF>(a, b, t, n, sa, sb);                                                          \
  }
PPD_SUMSQ_CLONE(sumsq_f32_ref, float, true)
PPD_SUMSQ_CLONE(sumsq_f32, float, false)
PPD_SUMSQ_CLONE(sumsq_bf16_ref, c10::BFloat16, true)
PPD_SUMSQ_CLONE(sumsq_bf16, c10::BFloat16, false)
PPD_SUMSQ_CLONE(sumsq_f16_ref, c10::Half, true)
PPD_SUMSQ_CLONE(sumsq_f16, c10::Half, false)
#undef PPD_SUMSQ_CLONE

template <typename T, bool HAS_REF>
void sumsq(const T* a, const T* b, const T* t, int64_t n, double& sa, double& sb) {
  if constexpr (std::is_same_v<T, float>) {
    HAS_REF ? sumsq_f32_ref(a, b, t, n, sa, sb) : sumsq_f32(a, b, t, n, sa, sb);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    HAS_REF ? sumsq_bf16_ref(a, b, t, n, sa, sb) : sumsq_bf16(a, b, t, n, sa, sb);
  } else {
    HAS_REF ? sumsq_f16_ref(a, b, t, n, sa, sb) : sumsq_f16(a, b, t, n, sa, sb);
  }
}

// Per-row sums of squares for model (and ref) against target, contiguous inputs of shape (n, d).
template <typename T, bool HAS_REF>
void row_sumsq(const T* a, const T* b, const T* t, int64_t n, int64_t d, std::vector<double>& sa,
               std::vector<double>& sb) {
  const int64_t per_row = (d + kChunk - 1) / kChunk;
  std::vector<double> pa(n * per_row), pb(n * per_row);
  at::parallel_for(0, n * per_row, grain_items(d), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / per_row, c = item % per_row;
      const int64_t off = row * d + c * kChunk;
      const int64_t len = std::min(kChunk, d - c * kChunk);
      sumsq<T, HAS_REF>(a + off, HAS_REF ? b + off : nullptr, t + off, len, pa[item], pb[item]);
    }
  });
  sa.assign(n, 0.0);
  sb.assign(n, 0.0);
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t c = 0; c < per_row; ++c) {
      sa[row] += pa[row * per_row + c];
      sb[row] += pb[row * per_row + c];
    }
  }
}

// out[row, :] = coef[row] * (pred - target), over contiguous (n, d); coef already holds 2 / D.
template <typename T>
void scaled_diff(const T* p, const T* t, const std::vector<float>& coef, T* out, int64_t n, int64_t d) {
  const int64_t per_row = (d + kChunk - 1) / kChunk;
  at::parallel_for(0, n * per_row, grain_items(d), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / per_row, c = item % per_row;
      const int64_t off = row * d + c * kChunk;
      const int64_t len = std::min(kChunk, d - c * kChunk);
      const float k = coef[row];
      const T* pp = p + off;
      const T* pt = t + off;
      T* po = out + off;
      for (int64_t j = 0; j < len; ++j) {
        po[j] = static_cast<T>(k * (static_cast<float>(pp[j]) - static_cast<float>(pt[j])));
      }
    }
  });
}

// Dispatches the three supported dtypes (checked earlier) to a typed lambda.
template <typename F>
void dispatch_dtype(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "ppd: unsupported dtype ", t);
  }
}

std::vector<double> weights_or_ones(const std::optional<at::Tensor>& weight, int64_t num_pairs) {
  std::vector<double> w(num_pairs, 1.0);
  if (weight.has_value()) {
    const at::Tensor wc = weight->to(at::kDouble).contiguous();
    const double* pw = wc.data_ptr<double>();
    std::copy(pw, pw + num_pairs, w.begin());
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor> paired_mse_cpu(const at::Tensor& model_pred,
                                                  const std::optional<at::Tensor>& ref_pred,
                                                  const at::Tensor& target) {
  const Dims dims = check_pair(model_pred, target, "paired_mse", "model_pred");
  const bool has_ref = ref_pred.has_value();
  if (has_ref) check_pair(*ref_pred, target, "paired_mse", "ref_pred");
  const at::Tensor m = model_pred.contiguous(), t = target.contiguous();
  const at::Tensor r = has_ref ? ref_pred->contiguous() : at::Tensor();
  std::vector<double> sm, sr;
  dispatch_dtype(m.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (has_ref) {
      row_sumsq<T, true>(m.const_data_ptr<T>(), r.const_data_ptr<T>(), t.const_data_ptr<T>(), dims.n, dims.d, sm, sr);
    } else {
      row_sumsq<T, false>(m.const_data_ptr<T>(), nullptr, t.const_data_ptr<T>(), dims.n, dims.d, sm, sr);
    }
  });
  // float64 outputs: the losses take differences of these MSEs and scale them by beta/2, so rounding them
  // to float32 here would dominate the error of every loss built on paired_mse.
  const auto f64 = model_pred.options().dtype(at::kDouble);
  at::Tensor model_mse = at::empty({dims.n}, f64);
  at::Tensor ref_mse = at::empty({has_ref ? dims.n : 0}, f64);
  double* pm = model_mse.data_ptr<double>();
  double* pr = ref_mse.data_ptr<double>();
  for (int64_t i = 0; i < dims.n; ++i) {
    pm[i] = sm[i] / static_cast<double>(dims.d);
    if (has_ref) pr[i] = sr[i] / static_cast<double>(dims.d);
  }
  return {model_mse, ref_mse};
}

at::Tensor mse_backward_cpu(const at::Tensor& grad_mse, const at::Tensor& pred, const at::Tensor& target) {
  const Dims dims = check_pair(pred, target, "mse_backward", "pred");
  TORCH_CHECK(grad_mse.dim() == 1 && grad_mse.size(0) == dims.n, "mse_backward: grad_mse must have shape (",
              dims.n, ",) for pred shape ", pred.sizes(), ", got ", grad_mse.sizes());
  const at::Tensor g = grad_mse.to(at::kDouble).contiguous();
  std::vector<float> coef(dims.n);
  for (int64_t i = 0; i < dims.n; ++i) {
    coef[i] = static_cast<float>(g.const_data_ptr<double>()[i] * 2.0 / static_cast<double>(dims.d));
  }
  const at::Tensor p = pred.contiguous(), t = target.contiguous();
  at::Tensor out = at::empty(pred.sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    scaled_diff<T>(p.const_data_ptr<T>(), t.const_data_ptr<T>(), coef, out.data_ptr<T>(), dims.n, dims.d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cpu(const at::Tensor& model_pred,
                                                                        const at::Tensor& ref_pred,
                                                                        const at::Tensor& target,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        double beta) {
  const Dims dims = check_dpo(model_pred, ref_pred, target, weight, beta, "dpo_loss");
  const int64_t num_pairs = dims.n / 2;
  const at::Tensor m = model_pred.contiguous(), r = ref_pred.contiguous(), t = target.contiguous();
  std::vector<double> sm, sr;
  dispatch_dtype(m.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    row_sumsq<T, true>(m.const_data_ptr<T>(), r.const_data_ptr<T>(), t.const_data_ptr<T>(), dims.n, dims.d, sm, sr);
  });
  const std::vector<double> w = weights_or_ones(weight, num_pairs);
  const auto f32 = model_pred.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor inside = at::empty({num_pairs}, f32);
  at::Tensor model_mse = at::empty({dims.n}, f32);
  at::Tensor ref_mse = at::empty({dims.n}, f32);
  const double inv_d = 1.0 / static_cast<double>(dims.d);
  double total = 0.0;
  for (int64_t b = 0; b < num_pairs; ++b) {
    const double x = pair_inside(sm[b] * inv_d, sr[b] * inv_d, sm[b + num_pairs] * inv_d,
                                 sr[b + num_pairs] * inv_d, w[b], beta);
    inside.data_ptr<float>()[b] = static_cast<float>(x);
    total += softplus(-x);
  }
  for (int64_t i = 0; i < dims.n; ++i) {
    model_mse.data_ptr<float>()[i] = static_cast<float>(sm[i] * inv_d);
    ref_mse.data_ptr<float>()[i] = static_cast<float>(sr[i] * inv_d);
  }
  loss.data_ptr<float>()[0] = static_cast<float>(total / static_cast<double>(num_pairs));
  return {loss, inside, model_mse, ref_mse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_ref_mse_cpu(const at::Tensor& model_pred,
                                                                  const at::Tensor& ref_mse,
                                                                  const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  double beta) {
  const Dims dims = check_dpo_ref_mse(model_pred, ref_mse, target, weight, beta, "dpo_loss_ref_mse");
  const int64_t num_pairs = dims.n / 2;
  const at::Tensor m = model_pred.contiguous(), t = target.contiguous();
  const at::Tensor r = ref_mse.contiguous();
  const double* er = r.const_data_ptr<double>();
  std::vector<double> sm, unused;
  dispatch_dtype(m.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    row_sumsq<T, false>(m.const_data_ptr<T>(), nullptr, t.const_data_ptr<T>(), dims.n, dims.d, sm, unused);
  });
  const std::vector<double> w = weights_or_ones(weight, num_pairs);
  at::Tensor loss = at::empty({}, model_pred.options().dtype(at::kFloat));
  at::Tensor inside = at::empty({num_pairs}, model_pred.options().dtype(at::kFloat));
  at::Tensor model_mse = at::empty({dims.n}, model_pred.options().dtype(at::kDouble));
  const double inv_d = 1.0 / static_cast<double>(dims.d);
  double* pm = model_mse.data_ptr<double>();
  for (int64_t i = 0; i < dims.n; ++i) pm[i] = sm[i] * inv_d;
  double total = 0.0;
  for (int64_t b = 0; b < num_pairs; ++b) {
    const double x = pair_inside(pm[b], er[b], pm[b + num_pairs], er[b + num_pairs], w[b], beta);
    inside.data_ptr<float>()[b] = static_cast<float>(x);
    total += softplus(-x);
  }
  loss.data_ptr<float>()[0] = static_cast<float>(total / static_cast<double>(num_pairs));
  return {loss, inside, model_mse};
}

at::Tensor dpo_loss_backward_cpu(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_inside,
                                 const std::optional<at::Tensor>& grad_model_mse, const at::Tensor& inside,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& model_pred,
                                 const at::Tensor& target, double beta) {
  const Dims dims = check_dpo_backward(grad_loss, grad_inside, grad_model_mse, inside, model_pred, target);
  const int64_t num_pairs = dims.n / 2;
  const double gl = grad_loss.to(at::kDouble).item<double>();
  const at::Tensor ins = inside.to(at::kDouble).contiguous();
  const at::Tensor gi = grad_inside.has_value() ? grad_inside->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor gm = grad_model_mse.has_value() ? grad_model_mse->to(at::kDouble).contiguous() : at::Tensor();
  const std::vector<double> w = weights_or_ones(weight, num_pairs);
  std::vector<float> coef(dims.n);
  const double scale = 2.0 / static_cast<double>(dims.d);
  for (int64_t i = 0; i < dims.n; ++i) {
    const int64_t b = i % num_pairs;
    const double sign = i < num_pairs ? -1.0 : 1.0;
    const double c = model_mse_coef(ins.const_data_ptr<double>()[b], w[b], beta, gl,
                                    gi.defined() ? gi.const_data_ptr<double>()[b] : 0.0,
                                    gm.defined() ? gm.const_data_ptr<double>()[i] : 0.0, sign, num_pairs);
    coef[i] = static_cast<float>(c * scale);
  }
  const at::Tensor p = model_pred.contiguous(), t = target.contiguous();
  at::Tensor out = at::empty(model_pred.sizes(), model_pred.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    scaled_diff<T>(p.const_data_ptr<T>(), t.const_data_ptr<T>(), coef, out.data_ptr<T>(), dims.n, dims.d);
  });
  return out;
}

}  // namespace
}  // namespace ppd::dpo

TORCH_LIBRARY_IMPL(ppd, CPU, m) {
  m.impl("paired_mse", &ppd::dpo::paired_mse_cpu);
  m.impl("mse_backward", &ppd::dpo::mse_backward_cpu);
  m.impl("dpo_loss", &ppd::dpo::dpo_loss_cpu);
  m.impl("dpo_loss_ref_mse", &ppd::dpo::dpo_loss_ref_mse_cpu);
  m.impl("dpo_loss_backward", &ppd::dpo::dpo_loss_backward_cpu);
}
