// Every schema of the `ppd` op library, in one place. CPU kernels register in csrc/cpu/*.cpp,
// CUDA kernels in csrc/cuda/*.cu, against these strings; the Python side (ppd_engine/ops/*.py)
// adds fake kernels (so torch.compile can trace) and autograd formulas.
#include <torch/library.h>

#ifndef PPD_NO_PYTHON
#include <Python.h>
// A bare module: importing ppd_engine._C loads the shared library, whose static initialisers
// register the ops with the dispatcher. No pybind11 bindings are needed.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(ppd, m) {
  // ---- ε-MSE and the Diffusion-DPO loss (csrc/*/dpo_loss.*) ----------------------------------
  // Per-sample mean over all non-batch dims of (pred - target)^2: fp32 differences, double sums,
  // float64 outputs (the preference losses scale differences of these by beta/2).
  // ref_pred may be None (reference-free losses); its output is then an empty (0,) tensor.
  m.def("paired_mse(Tensor model_pred, Tensor? ref_pred, Tensor target) -> (Tensor, Tensor)");
  // d mse_i / d pred = grad_mse[i] * 2 (pred - target) / numel_per_sample, in pred's dtype.
  m.def("mse_backward(Tensor grad_mse, Tensor pred, Tensor target) -> Tensor");
  // Fused Diffusion-DPO: rows [0, B) are winners, [B, 2B) losers. Returns the scalar loss, the
  // per-pair `inside` (B,), and per-sample model/ref MSE (2B,), all fp32.
  m.def(
      "dpo_loss(Tensor model_pred, Tensor ref_pred, Tensor target, Tensor? weight, float beta)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // The same loss with the reference's per-sample MSEs precomputed (train.reference=cached): ref_mse is
  // (2B,) float64, as paired_mse returns it, so no reference prediction exists at training time.
  // Returns the loss (), inside (B,) fp32 and model_mse (2B,) float64; its gradient is
  // dpo_loss_backward's (the chain rule only needs inside, weight, model_pred and target).
  m.def(
      "dpo_loss_ref_mse(Tensor model_pred, Tensor ref_mse, Tensor target, Tensor? weight, float beta)"
      " -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. model_pred, recomputed from the saved `inside` in one elementwise pass; takes the
  // incoming grads of loss, inside and model_mse (None = zero), so every output is differentiable.
  m.def(
      "dpo_loss_backward(Tensor grad_loss, Tensor? grad_inside, Tensor? grad_model_mse, Tensor inside,"
      " Tensor? weight, Tensor model_pred, Tensor target, float beta) -> Tensor");

  // ---- dual cross-attention (csrc/*/dual_attention.*) ------------------------------------------
  // out = softmax(q k_text^T * s) v_text + user_scale[b] * softmax(q k_user^T * s) v_user.
  // Layout (B, H, L, D), any strides; k_text/v_text batch Bt divides B (query batch b uses b % Bt).
  // Returns out (q's layout) and the two log-sum-exp rows (B, H, Lq), fp32.
  m.def(
      "dual_cross_attention(Tensor q, Tensor k_text, Tensor v_text, Tensor k_user, Tensor v_user,"
      " Tensor user_scale, float softmax_scale) -> (Tensor, Tensor, Tensor)");
  // Returns dq, dk_text, dv_text, dk_user, dv_user, d_user_scale (B,) fp32. The softmax correction
  // rowsum(dO * O_seg) is rebuilt from the recomputed probabilities, so `out` is not needed; with
  // text_grads false dk_text/dv_text are empty (0,) tensors.
  m.def(
      "dual_cross_attention_backward(Tensor grad_out, Tensor q, Tensor k_text, Tensor v_text,"
      " Tensor k_user, Tensor v_user, Tensor user_scale, Tensor lse_text,"
      " Tensor lse_user, float softmax_scale, bool text_grads)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
