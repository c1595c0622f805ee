// Shared by the CPU and CUDA kernels of the ε-MSE / Diffusion-DPO ops: input validation (one set of
// error messages for both devices) and the per-pair math, written once for host and device so the
// two backends cannot disagree on a formula.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace ppd::dpo {

// Rows and elements per row of a (N, ...) prediction tensor.
struct Dims {
  int64_t n;
  int64_t d;
};

inline bool supported_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

// Checks one prediction against the target: same shape, dtype and device, a float dtype the kernels
// handle, at least one non-batch element. Messages name the op and both shapes.
inline Dims check_pair(const at::Tensor& pred, const at::Tensor& target, const char* op, const char* name) {
  TORCH_CHECK(pred.dim() >= 1, op, ": ", name, " must have a batch dim, got a 0-dim tensor");
  TORCH_CHECK(pred.sizes() == target.sizes(), op, ": ", name, " shape ", pred.sizes(),
              " does not match target shape ", target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), op, ": ", name, " dtype ", pred.scalar_type(),
              " does not match target dtype ", target.scalar_type());
  TORCH_CHECK(pred.device() == target.device(), op, ": ", name, " is on ", pred.device(),
              " but target is on ", target.device());
  TORCH_CHECK(supported_dtype(pred.scalar_type()), op, ": ", name, " dtype ", pred.scalar_type(),
              " is not supported (float32, bfloat16, float16)");
  const int64_t n = pred.size(0);
  TORCH_CHECK(n > 0, op, ": ", name, " has an empty batch, shape ", pred.sizes());
  const int64_t d = pred.numel() / n;
  TORCH_CHECK(d > 0, op, ": ", name, " has no elements per sample, shape ", pred.sizes());
  return {n, d};
}

// The DPO layout: 2B rows, winners first. Also checks weight (B,) and beta.
inline Dims check_dpo(const at::Tensor& model_pred, const at::Tensor& ref_pred, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, double beta, const char* op) {
  Dims dims = check_pair(model_pred, target, op, "model_pred");
  check_pair(ref_pred, target, op, "ref_pred");
  TORCH_CHECK(dims.n % 2 == 0, op, ": the first dim must be 2B (B winners, then B losers), got shape ",
              model_pred.sizes());
  TORCH_CHECK(std::isfinite(beta) && beta > 0.0, op, ": beta must be a positive finite number, got ", beta);
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == dims.n / 2, op, ": weight must have shape (B,) = (", dims.n / 2,
                ",) for model_pred shape ", model_pred.sizes(), ", got ", w.sizes());
    TORCH_CHECK(w.device() == model_pred.device(), op, ": weight is on ", w.device(), " but model_pred is on ",
                model_pred.device());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": weight must be a float tensor, got ", w.scalar_type());
  }
  return dims;
}

// dpo_loss_ref_mse: model_pred/target as for dpo_loss, ref_mse a float64 (2B,) vector on the same device.
inline Dims check_dpo_ref_mse(const at::Tensor& model_pred, const at::Tensor& ref_mse, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, double beta, const char* op) {
  const Dims dims = check_dpo(model_pred, model_pred, target, weight, beta, op);
  TORCH_CHECK(ref_mse.dim() == 1 && ref_mse.size(0) == dims.n, op, ": ref_mse must have shape (2B,) = (", dims.n,
              ",) for model_pred shape ", model_pred.sizes(), ", got ", ref_mse.sizes());
  TORCH_CHECK(ref_mse.scalar_type() == c10::ScalarType::Double, op, ": ref_mse must be float64 (as paired_mse "
              "returns it), got ", ref_mse.scalar_type());
  TORCH_CHECK(ref_mse.device() == model_pred.device(), op, ": ref_mse is on ", ref_mse.device(),
              " but model_pred is on ", model_pred.device());
  return dims;
}

// The arguments of dpo_loss_backward besides model_pred/target; returns the pair layout.
inline Dims check_dpo_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_inside,
                               const std::optional<at::Tensor>& grad_model_mse, const at::Tensor& inside,
                               const at::Tensor& model_pred, const at::Tensor& target) {
  const Dims dims = check_pair(model_pred, target, "dpo_loss_backward", "model_pred");
  TORCH_CHECK(dims.n % 2 == 0, "dpo_loss_backward: the first dim must be 2B, got shape ", model_pred.sizes());
  const int64_t pairs = dims.n / 2;
  TORCH_CHECK(grad_loss.numel() == 1, "dpo_loss_backward: grad_loss must be a scalar, got shape ", grad_loss.sizes());
  TORCH_CHECK(inside.dim() == 1 && inside.size(0) == pairs, "dpo_loss_backward: inside must have shape (", pairs,
              ",), got ", inside.sizes());
  if (grad_inside.has_value()) {
    TORCH_CHECK(grad_inside->dim() == 1 && grad_inside->size(0) == pairs,
                "dpo_loss_backward: grad_inside must have shape (", pairs, ",), got ", grad_inside->sizes());
  }
  if (grad_model_mse.has_value()) {
    TORCH_CHECK(grad_model_mse->dim() == 1 && grad_model_mse->size(0) == dims.n,
                "dpo_loss_backward: grad_model_mse must have shape (", dims.n, ",), got ", grad_model_mse->sizes());
  }
  return dims;
}

C10_HOST_DEVICE inline bool is_finite(double x) {
#ifdef __CUDA_ARCH__
  return ::isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// (a - t)^2 in double. For float32 inputs the difference is formed in double too: its fp32 rounding
// (relative 2^-24 per element) reaches the loss through beta/2 (2500 at the official beta) as an error
// larger than PyTorch's own. For 16-bit inputs the fp32 difference is already exact.
template <typename T>
C10_HOST_DEVICE inline double sq_diff(T a, T t) {
  if constexpr (std::is_same_v<T, float>) {
    const double d = static_cast<double>(a) - static_cast<double>(t);
    return d * d;
  } else {
    const double d = static_cast<float>(a) - static_cast<float>(t);
    return d * d;
  }
}

// -log(sigmoid(-x)) = log(1 + exp(x)), without overflow for large |x|.
C10_HOST_DEVICE inline double softplus(double x) {
  return x > 0.0 ? x + ::log1p(::exp(-x)) : ::log1p(::exp(x));
}

// sigmoid(x) for any finite x without overflow.
C10_HOST_DEVICE inline double sigmoid(double x) {
  if (x >= 0.0) return 1.0 / (1.0 + ::exp(-x));
  const double e = ::exp(x);
  return e / (1.0 + e);
}

// inside = -0.5 * beta * w * ((e_model_w - e_ref_w) - (e_model_l - e_ref_l)). A non-finite MSE (NaN/Inf in
// an input) makes inside NaN, so the loss is NaN rather than a finite number that hides the bad input
// (+inf inside would give loss 0).
C10_HOST_DEVICE inline double pair_inside(double em_w, double er_w, double em_l, double er_l, double w,
                                          double beta) {
  if (!is_finite(em_w + er_w + em_l + er_l)) return NAN;
  return -0.5 * beta * w * ((em_w - er_w) - (em_l - er_l));
}

// d(total)/d(e_model) for the winner (sign -1) or loser (sign +1) row of a pair, where total =
// grad_loss * loss + sum(grad_inside * inside) + sum(grad_mse * model_mse). `num_pairs` = B.
C10_HOST_DEVICE inline double model_mse_coef(double inside, double w, double beta, double grad_loss,
                                             double grad_inside, double grad_mse, double sign,
                                             int64_t num_pairs) {
  // d loss / d inside = -sigmoid(-inside) / B;  d inside / d e_model_{w,l} = -/+ 0.5 * beta * w.
  const double g_inside = grad_loss * (-sigmoid(-inside) / static_cast<double>(num_pairs)) + grad_inside;
  return g_inside * sign * 0.5 * beta * w + grad_mse;
}

}  // namespace ppd::dpo
