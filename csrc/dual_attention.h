// Shared by the CPU and CUDA kernels of ppd::dual_cross_attention (schemas in registration.cpp):
// input validation with errors that name the offending argument, and the shape bundle both use.
//
// out[b,h,i] = softmax(q k_text^T * s)[b,h,i] v_text[b % Bt, h]
//            + user_scale[b] * softmax(q k_user^T * s)[b,h,i] v_user[b, h]
// Text K/V have Bt rows, Bt dividing B: query batch b reads text batch b % Bt, so the paired
// forward can share one text K/V across the policy/reference x winner/loser rows without copies.
// Every tensor may have arbitrary strides (diffusers hands over (B, L, H*D) views transposed to
// (B, H, L, D)); the kernels index through strides instead of copying.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

// The kernels take fp32, bf16 and fp16 (fp32 accumulation in all three).
#define PPD_DUAL_ATTN_DISPATCH(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace ppd::dual_attention {

struct Shapes {
  int64_t B, Bt, H, Lq, Lt, Lu, D;
};

// Element strides of a (B, H, L, D) tensor.
struct Strides4 {
  int64_t b, h, l, d;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "dual_cross_attention: ", name, " must be (batch, heads, length, head_dim), got shape ",
              t.sizes());
}

inline Shapes check_inputs(const at::Tensor& q, const at::Tensor& k_text, const at::Tensor& v_text,
                           const at::Tensor& k_user, const at::Tensor& v_user, const at::Tensor& user_scale) {
  check_4d(q, "q");
  check_4d(k_text, "k_text");
  check_4d(v_text, "v_text");
  check_4d(k_user, "k_user");
  check_4d(v_user, "v_user");
  Shapes s{q.size(0), k_text.size(0), q.size(1), q.size(2), k_text.size(2), k_user.size(2), q.size(3)};
  TORCH_CHECK(v_text.sizes() == k_text.sizes(), "dual_cross_attention: v_text shape ", v_text.sizes(),
              " != k_text shape ", k_text.sizes());
  TORCH_CHECK(v_user.sizes() == k_user.sizes(), "dual_cross_attention: v_user shape ", v_user.sizes(),
              " != k_user shape ", k_user.sizes());
  TORCH_CHECK(s.Bt >= 1 && s.B % s.Bt == 0, "dual_cross_attention: k_text batch ", s.Bt,
              " must divide q batch ", s.B, " (query batch b uses text batch b % Bt)");
  TORCH_CHECK(k_user.size(0) == s.B, "dual_cross_attention: k_user batch ", k_user.size(0), " != q batch ", s.B);
  TORCH_CHECK(k_text.size(1) == s.H && k_user.size(1) == s.H, "dual_cross_attention: heads differ: q ", s.H,
              ", k_text ", k_text.size(1), ", k_user ", k_user.size(1));
  TORCH_CHECK(k_text.size(3) == s.D && k_user.size(3) == s.D, "dual_cross_attention: head_dim differs: q ", s.D,
              ", k_text ", k_text.size(3), ", k_user ", k_user.size(3));
  TORCH_CHECK(s.Lt >= 1, "dual_cross_attention: k_text has no keys (length 0)");
  TORCH_CHECK(s.Lu >= 1, "dual_cross_attention: k_user has no keys (length 0); call plain attention instead");
  TORCH_CHECK(s.D >= 1, "dual_cross_attention: head_dim must be >= 1");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "dual_cross_attention: q dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k_text.scalar_type() == dt && v_text.scalar_type() == dt && k_user.scalar_type() == dt &&
                  v_user.scalar_type() == dt,
              "dual_cross_attention: q, k_text, v_text, k_user, v_user must share one dtype, got ", dt, ", ",
              k_text.scalar_type(), ", ", v_text.scalar_type(), ", ", k_user.scalar_type(), ", ",
              v_user.scalar_type());
  TORCH_CHECK(user_scale.dim() == 1 && user_scale.size(0) == s.B, "dual_cross_attention: user_scale must be (",
              s.B, ",), got shape ", user_scale.sizes());
  TORCH_CHECK(at::isFloatingType(user_scale.scalar_type()), "dual_cross_attention: user_scale must be floating, got ",
              user_scale.scalar_type());
  const auto dev = q.device();
  for (const at::Tensor* t : {&k_text, &v_text, &k_user, &v_user, &user_scale}) {
    TORCH_CHECK(t->device() == dev, "dual_cross_attention: all inputs must be on ", dev, ", found one on ",
                t->device());
  }
  return s;
}

inline void check_backward_extras(const Shapes& s, const at::Tensor& q, const at::Tensor& grad_out,
                                  const at::Tensor& lse_text, const at::Tensor& lse_user) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "dual_cross_attention_backward: grad_out shape ", grad_out.sizes(),
              " != q shape ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "dual_cross_attention_backward: grad_out dtype ",
              grad_out.scalar_type(), " != q dtype ", q.scalar_type());
  for (const at::Tensor* t : {&lse_text, &lse_user}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == s.B && t->size(1) == s.H && t->size(2) == s.Lq &&
                    t->scalar_type() == at::kFloat,
                "dual_cross_attention_backward: lse must be float32 (", s.B, ", ", s.H, ", ", s.Lq, "), got ",
                t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device() == q.device(), "dual_cross_attention_backward: lse on ", t->device(), ", q on ",
                q.device());
  }
}

}  // namespace ppd::dual_attention
