// C++ check of ppd::dual_cross_attention (CPU kernel) through the dispatcher, without Python:
// forward against a naive double-precision loop implementation, and every gradient of the backward
// op against central finite differences of that naive forward. Odd shapes, text shared by Bt | B,
// strided (diffusers-layout) inputs, and a gate-0 row.
//
// Entry point: int run_dual_attention_tests() (non-zero on failure); PPD_DUAL_ATTENTION_TEST_MAIN
// builds this file as its own CTest executable (see CMakeLists.txt and harness.h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <tuple>
#include <vector>

#include "harness.h"

namespace {

struct Case {
  int64_t B, Bt, H, Lq, Lt, Lu, D;
};

// (B, H, L, D) viewed from (B, L, H, D) memory, as diffusers hands tensors over.
at::Tensor strided_randn(int64_t b, int64_t h, int64_t l, int64_t d) {
  return at::randn({b, l, h, d}, at::kFloat).transpose(1, 2);
}

// Naive double forward: loops over every (b, h, i), two explicit softmaxes.
at::Tensor naive_forward(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& vt, const at::Tensor& ku,
                         const at::Tensor& vu, const at::Tensor& us, double scale) {
  const auto Q = q.to(at::kDouble).contiguous(), KT = kt.to(at::kDouble).contiguous(),
             VT = vt.to(at::kDouble).contiguous(), KU = ku.to(at::kDouble).contiguous(),
             VU = vu.to(at::kDouble).contiguous(), US = us.to(at::kDouble).contiguous();
  const int64_t B = Q.size(0), H = Q.size(1), Lq = Q.size(2), D = Q.size(3), Bt = KT.size(0), Lt = KT.size(2),
                Lu = KU.size(2);
  auto out = at::zeros({B, H, Lq, D}, at::kDouble);
  auto qa = Q.accessor<double, 4>();
  auto kta = KT.accessor<double, 4>(), vta = VT.accessor<double, 4>();
  auto kua = KU.accessor<double, 4>(), vua = VU.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  auto usa = US.accessor<double, 1>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Lq; ++i)
        for (int seg = 0; seg < 2; ++seg) {
          const int64_t L = seg ? Lu : Lt, kb = seg ? b : b % Bt;
          const auto& K = seg ? kua : kta;
          const auto& V = seg ? vua : vta;
          std::vector<double> s(L);
          double m = -INFINITY, sum = 0;
          for (int64_t j = 0; j < L; ++j) {
            double acc = 0;
            for (int64_t d = 0; d < D; ++d) acc += qa[b][h][i][d] * K[kb][h][j][d];
            s[j] = acc * scale;
            m = std::max(m, s[j]);
          }
          for (int64_t j = 0; j < L; ++j) sum += (s[j] = std::exp(s[j] - m));
          const double w = seg ? usa[b] : 1.0;
          for (int64_t j = 0; j < L; ++j)
            for (int64_t d = 0; d < D; ++d) oa[b][h][i][d] += w * s[j] / sum * V[kb][h][j][d];
        }
  return out;
}

using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Three call_forward(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& vt, const at::Tensor& ku,
                   const at::Tensor& vu, const at::Tensor& us, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ppd::dual_cross_attention", "")
                             .typed<Three(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double)>();
  return op.call(q, kt, vt, ku, vu, us, scale);
}

Six call_backward(const at::Tensor& go, const at::Tensor& q, const at::Tensor& kt, const at::Tensor& vt,
                  const at::Tensor& ku, const at::Tensor& vu, const at::Tensor& us, const at::Tensor& lse_t,
                  const at::Tensor& lse_u, double scale, bool text_grads) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ppd::dual_cross_attention_backward", "")
          .typed<Six(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>();
  return op.call(go, q, kt, vt, ku, vu, us, lse_t, lse_u, scale, text_grads);
}

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  if (!(err <= tol * scale)) std::printf("  %s: max abs err %.3g > %.3g\n", what, err, tol * scale);
  PPD_CHECK(err <= tol * scale);
}

void run_case(const Case& c) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  auto q = strided_randn(c.B, c.H, c.Lq, c.D), kt = strided_randn(c.Bt, c.H, c.Lt, c.D),
       vt = strided_randn(c.Bt, c.H, c.Lt, c.D), ku = strided_randn(c.B, c.H, c.Lu, c.D),
       vu = strided_randn(c.B, c.H, c.Lu, c.D);
  auto us = at::rand({c.B}, at::kFloat) + 0.5;
  if (c.B > 1) us[1] = 0.0;  // gate-0 row
  auto [out, lse_t, lse_u] = call_forward(q, kt, vt, ku, vu, us, scale);
  expect_close("forward", out, naive_forward(q, kt, vt, ku, vu, us, scale), 1e-5);

  // Gradients of L = sum(go * out) against central differences of the naive double forward.
  auto go = at::randn({c.B, c.H, c.Lq, c.D}, at::kFloat);
  auto [dq, dkt, dvt, dku, dvu, dus] = call_backward(go, q, kt, vt, ku, vu, us, lse_t, lse_u, scale, true);
  const auto god = go.to(at::kDouble);
  std::vector<at::Tensor> inputs = {q, kt, vt, ku, vu, us};
  const std::vector<at::Tensor> grads = {dq, dkt, dvt, dku, dvu, dus};
  const char* names[] = {"dq", "dk_text", "dv_text", "dk_user", "dv_user", "d_user_scale"};
  for (size_t a = 0; a < inputs.size(); ++a) {
    // One random direction per input keeps the check O(1) forwards instead of O(numel).
    const auto dir = at::randn(inputs[a].sizes(), at::kDouble);
    const double eps = 1e-3;
    auto shifted = [&](double sgn) {
      std::vector<at::Tensor> x;
      for (size_t k = 0; k < inputs.size(); ++k)
        x.push_back(k == a ? inputs[k].to(at::kDouble) + sgn * eps * dir : inputs[k].to(at::kDouble));
      return (naive_forward(x[0], x[1], x[2], x[3], x[4], x[5], scale) * god).sum().item<double>();
    };
    const double fd = (shifted(1) - shifted(-1)) / (2 * eps);
    const double an = (grads[a].to(at::kDouble) * dir).sum().item<double>();
    if (!(std::abs(fd - an) <= 1e-3 * std::max(1.0, std::abs(fd))))
      std::printf("  %s: directional derivative %.6g, finite difference %.6g\n", names[a], an, fd);
    PPD_CHECK(std::abs(fd - an) <= 1e-3 * std::max(1.0, std::abs(fd)));
  }
  // Without text grads the text outputs are empty and the rest is unchanged.
  auto [dq2, dkt2, dvt2, dku2, dvu2, dus2] = call_backward(go, q, kt, vt, ku, vu, us, lse_t, lse_u, scale, false);
  PPD_CHECK(dkt2.numel() == 0 && dvt2.numel() == 0);
  expect_close("dq without text grads", dq2, dq, 1e-6);
  expect_close("dv_user without text grads", dvu2, dvu, 1e-6);
}

}  // namespace

PPD_TEST(single_key_single_query) { run_case({1, 1, 1, 1, 1, 1, 8}); }
PPD_TEST(text_shared_by_batch_77_plus_3_keys) { run_case({3, 1, 2, 13, 80, 3, 40}); }
PPD_TEST(text_batch_divides_batch_odd_head_dim) { run_case({4, 2, 1, 9, 77, 5, 24}); }

PPD_TEST(bad_input_is_named) {
  auto q = at::randn({2, 1, 3, 8}), kt = at::randn({1, 1, 4, 8}), ku = at::randn({2, 1, 2, 8});
  PPD_CHECK_THROWS(call_forward(q, kt, kt, ku, ku, at::ones({3}), 0.3), "user_scale must be (2,)");
  PPD_CHECK_THROWS(call_forward(q, kt, kt, ku.narrow(0, 0, 1), ku.narrow(0, 0, 1), at::ones({2}), 0.3), "k_user batch");
  PPD_CHECK_THROWS(call_forward(q, at::randn({2, 1, 4, 8}), kt, ku, ku, at::ones({2}), 0.3),
                   "v_text shape");
  PPD_CHECK_THROWS(call_forward(q.to(at::kDouble), kt, kt, ku, ku, at::ones({2}), 0.3), "dtype");
}

int run_dual_attention_tests() {
  at::manual_seed(0);
  return ppd::test::run_all();
}

#ifdef PPD_DUAL_ATTENTION_TEST_MAIN
int main() { return run_dual_attention_tests(); }
#endif
