// CPU kernels of ppd::paired_mse / mse_backward / dpo_loss / dpo_loss_backward, called through the
// dispatcher (so registration is tested too), against naive double loops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "harness.h"

namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Four call_dpo(const Tensor& m, const Tensor& r, const Tensor& t, const OptTensor& w, double beta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppd::dpo_loss", "")
                       .typed<Four(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double)>();
  return op.call(m, r, t, w, beta);
}

Tensor call_dpo_backward(const Tensor& gl, const OptTensor& gi, const OptTensor& gm, const Tensor& inside,
                         const OptTensor& w, const Tensor& m, const Tensor& t, double beta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppd::dpo_loss_backward", "")
                       .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&,
                                     const Tensor&, const Tensor&, double)>();
  return op.call(gl, gi, gm, inside, w, m, t, beta);
}

std::tuple<Tensor, Tensor> call_paired_mse(const Tensor& m, const OptTensor& r, const Tensor& t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppd::paired_mse", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&)>();
  return op.call(m, r, t);
}

Tensor call_mse_backward(const Tensor& g, const Tensor& p, const Tensor& t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppd::mse_backward", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>();
  return op.call(g, p, t);
}

// The values the kernel sees (after rounding to its dtype), as doubles, row-major (n, d).
std::vector<double> values(const Tensor& x) {
  const Tensor c = x.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

struct Naive {
  std::vector<double> em, er, inside, grad;
  double loss = 0.0;
};

// Straight from the formulas: per-sample mean squared error, inside, mean softplus(-inside), and the
// gradient of grad_loss * loss w.r.t. model_pred.
Naive naive_dpo(const Tensor& m, const Tensor& r, const Tensor& t, const std::vector<double>& w, double beta,
                double grad_loss) {
  const int64_t n = m.size(0), d = m.numel() / n, pairs = n / 2;
  const std::vector<double> vm = values(m), vr = values(r), vt = values(t);
  Naive out;
  out.em.assign(n, 0.0);
  out.er.assign(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const double a = vm[i * d + j] - vt[i * d + j], b = vr[i * d + j] - vt[i * d + j];
      out.em[i] += a * a / d;
      out.er[i] += b * b / d;
    }
  }
  out.inside.assign(pairs, 0.0);
  for (int64_t b = 0; b < pairs; ++b) {
    const double x = -0.5 * beta * w[b] * ((out.em[b] - out.er[b]) - (out.em[b + pairs] - out.er[b + pairs]));
    out.inside[b] = x;
    out.loss += std::log1p(std::exp(-x)) / pairs;
  }
  out.grad.assign(n * d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i % pairs;
    const double dl_dx = -1.0 / (1.0 + std::exp(out.inside[b])) / pairs;  // d softplus(-x)/dx / B
    const double dx_de = (i < pairs ? -0.5 : 0.5) * beta * w[b];
    for (int64_t j = 0; j < d; ++j) {
      out.grad[i * d + j] = grad_loss * dl_dx * dx_de * 2.0 * (vm[i * d + j] - vt[i * d + j]) / d;
    }
  }
  return out;
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Relative tolerance of the kernel's outputs: fp32 outputs of double sums; the gradient is rounded to
// the input dtype.
double grad_rtol(at::ScalarType dt) {
  return dt == at::kFloat ? 1e-5 : dt == at::kHalf ? 2e-3 : 1e-2;
}

void check_case(int64_t pairs, std::vector<int64_t> inner, at::ScalarType dt, double beta, bool with_weight) {
  std::vector<int64_t> shape{2 * pairs};
  shape.insert(shape.end(), inner.begin(), inner.end());
  const Tensor t = at::randn(shape).to(dt);
  const Tensor m = (t.to(at::kFloat) + 0.5 * at::randn(shape)).to(dt);
  const Tensor r = (t.to(at::kFloat) + 0.5 * at::randn(shape)).to(dt);
  std::vector<double> w(pairs, 1.0);
  OptTensor weight;
  if (with_weight) {
    const Tensor wt = at::rand({pairs}) + 0.5;
    w = values(wt);
    weight = wt;
  }
  const double grad_loss = 1.3;
  const Naive ref = naive_dpo(m, r, t, w, beta, grad_loss);
  auto [loss, inside, em, er] = call_dpo(m, r, t, weight, beta);
  PPD_CHECK(loss.dim() == 0 && inside.size(0) == pairs && em.size(0) == 2 * pairs && er.size(0) == 2 * pairs);
  PPD_CHECK(loss.scalar_type() == at::kFloat && inside.scalar_type() == at::kFloat);
  const std::vector<double> k_em = values(em), k_er = values(er), k_in = values(inside);
  for (int64_t i = 0; i < 2 * pairs; ++i) {
    PPD_CHECK_NEAR(k_em[i], ref.em[i], 2e-7 * ref.em[i]);
    PPD_CHECK_NEAR(k_er[i], ref.er[i], 2e-7 * ref.er[i]);
  }
  // inside amplifies MSE differences by beta/2; the kernel computes it from double sums.
  for (int64_t b = 0; b < pairs; ++b) PPD_CHECK_NEAR(k_in[b], ref.inside[b], 1e-6 * (1.0 + std::fabs(ref.inside[b])));
  PPD_CHECK_NEAR(loss.item<double>(), ref.loss, 1e-6 * (1.0 + ref.loss));

  const Tensor grad = call_dpo_backward(at::full({}, grad_loss), std::nullopt, std::nullopt, inside, weight, m, t, beta);
  PPD_CHECK(grad.sizes() == m.sizes() && grad.scalar_type() == dt);
  const std::vector<double> kg = values(grad);
  const double scale = max_abs(ref.grad);
  double worst = 0.0;
  for (size_t j = 0; j < kg.size(); ++j) {
    worst = std::max(worst, std::fabs(kg[j] - ref.grad[j]) - grad_rtol(dt) * std::fabs(ref.grad[j]));
  }
  PPD_CHECK(worst <= 1e-6 * scale);
}

}  // namespace

PPD_TEST(dpo_matches_naive_loops_fp32) {
  check_case(1, {4, 7, 9}, at::kFloat, 50.0, false);
  check_case(3, {4, 7, 9}, at::kFloat, 5000.0, true);
  check_case(8, {5}, at::kFloat, 20.0, true);
  check_case(2, {3, 111, 111}, at::kFloat, 2000.0, true);  // 36963 per row: several parallel chunks
}

PPD_TEST(dpo_matches_naive_loops_bf16_fp16) {
  check_case(3, {4, 7, 9}, at::kBFloat16, 50.0, true);
  check_case(3, {4, 7, 9}, at::kHalf, 50.0, true);
  check_case(2, {3, 111, 111}, at::kBFloat16, 2000.0, false);
}

PPD_TEST(paired_mse_and_mse_backward) {
  const Tensor t = at::randn({5, 3, 17});
  const Tensor m = t + 0.3 * at::randn({5, 3, 17});
  const Tensor r = t + 0.3 * at::randn({5, 3, 17});
  auto [em, er] = call_paired_mse(m, r, t);
  auto [em_only, er_none] = call_paired_mse(m, std::nullopt, t);
  PPD_CHECK(er_none.numel() == 0);
  PPD_CHECK(em.scalar_type() == at::kDouble && er.scalar_type() == at::kDouble);
  const Tensor exp_m = (m - t).pow(2).to(at::kDouble).mean({1, 2});
  const Tensor exp_r = (r - t).pow(2).to(at::kDouble).mean({1, 2});
  PPD_CHECK(at::allclose(em.to(at::kDouble), exp_m, 1e-6, 0.0));
  PPD_CHECK(at::allclose(er.to(at::kDouble), exp_r, 1e-6, 0.0));
  PPD_CHECK(at::equal(em, em_only));
  const Tensor g = at::randn({5});
  const Tensor grad = call_mse_backward(g, m, t);
  const Tensor exp_g = g.view({5, 1, 1}) * 2.0 * (m - t) / 51.0;
  PPD_CHECK(at::allclose(grad, exp_g, 1e-5, 1e-7));
}

PPD_TEST(non_contiguous_inputs_equal_contiguous) {
  const Tensor base_t = at::randn({4, 9, 6});
  const Tensor t = base_t.transpose(1, 2);
  const Tensor m = (base_t + 0.4 * at::randn({4, 9, 6})).transpose(1, 2);
  const Tensor r = (base_t + 0.4 * at::randn({4, 9, 6})).transpose(1, 2);
  PPD_CHECK(!t.is_contiguous());
  auto [l1, i1, m1, r1] = call_dpo(m, r, t, std::nullopt, 30.0);
  auto [l2, i2, m2, r2] = call_dpo(m.contiguous(), r.contiguous(), t.contiguous(), std::nullopt, 30.0);
  PPD_CHECK(at::equal(l1, l2) && at::equal(i1, i2) && at::equal(m1, m2) && at::equal(r1, r2));
}

PPD_TEST(nan_and_inf_give_nan_loss) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    const Tensor t = at::randn({4, 10});
    Tensor m = t + 0.2 * at::randn({4, 10});
    const Tensor r = t + 0.2 * at::randn({4, 10});
    m.index_put_({1, 3}, bad);
    auto [loss, inside, em, er] = call_dpo(m, r, t, std::nullopt, 40.0);
    PPD_CHECK(std::isnan(loss.item<double>()));
    PPD_CHECK(std::isnan(inside[1].item<double>()) && std::isfinite(inside[0].item<double>()));
  }
}

PPD_TEST(bad_input_is_named) {
  const Tensor t = at::randn({3, 4});
  PPD_CHECK_THROWS(call_dpo(t, t, t, std::nullopt, 1.0), "must be 2B");
  const Tensor t4 = at::randn({4, 4});
  PPD_CHECK_THROWS(call_dpo(t4, t4, at::randn({4, 5}), std::nullopt, 1.0), "does not match target shape");
  PPD_CHECK_THROWS(call_dpo(t4, t4.to(at::kHalf), t4, std::nullopt, 1.0), "dtype");
  PPD_CHECK_THROWS(call_dpo(t4, t4, t4, std::nullopt, 0.0), "beta must be a positive finite number");
  PPD_CHECK_THROWS(call_dpo(t4, t4, t4, at::ones({3}), 1.0), "weight must have shape (B,) = (2,)");
  PPD_CHECK_THROWS(call_dpo(t4.to(at::kDouble), t4.to(at::kDouble), t4.to(at::kDouble), std::nullopt, 1.0),
                   "is not supported");
}

// Entry point (returns non-zero on failure); PPD_DPO_LOSS_TEST_MAIN builds this file as its own executable.
int run_dpo_loss_tests() { return ppd::test::run_all(); }

#ifdef PPD_DPO_LOSS_TEST_MAIN
int main() { return run_dpo_loss_tests(); }
#endif
