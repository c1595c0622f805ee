"""The attention processor that adds the user branch next to a diffusers text cross-attention.

    out = to_out( softmax(Q K_text^T / sqrt(d)) V_text  +  g_b * softmax(Q K_user^T / sqrt(d)) V_user )
    K_user = to_k_ip(user tokens), V_user = to_v_ip(user tokens)

The text path is a line-for-line copy of diffusers' `AttnProcessor2_0` (same ops, same SDPA
call), so with the branch off the layer is bit-identical to the stock one; the user term is added
before `to_out`, exactly where diffusers' `IPAdapterAttnProcessor2_0` adds it, so an export runs
the same arithmetic in stock diffusers. Rows with gate 0 get `h + 0 * finite = h`: bit-identical.

`to_v_ip` starts at zero, so at initialisation the policy equals the base exactly (the DPO
log-ratio starts at 0); `to_k_ip` starts as a copy of the layer's `to_k` when shapes allow
(IP-Adapter's own initialisation), so the first steps get useful attention patterns.

Runtime inputs come from a `UserState` shared by all processors of one model (set by
`user_conditioning`), not from `cross_attention_kwargs`, so the model's normal call is unchanged.

With attention="fused" (or "auto" on a device where the fused op is the measured-faster choice, see
`resolve_attention`) and the user branch on, the text and user attention run as one
`ppd::dual_cross_attention` call (ppd_engine.ops.dual_attention) when it supports the inputs; it
takes cached text K/V of Bt captions without copying them to the batch. Gate-0 rows then equal the
base within the op's rounding (fp32: ~1e-6), not bit-for-bit; with the branch off (None / all-zero
gate) every mode runs the stock SDPA path.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("sdpa", "fused", "auto")

# Device types on which attention="auto" takes the fused op. CUDA is not among them: estimated from
# the code, the CUDA-core kernel is 3-5x slower than two SDPA calls (flash / cuDNN, tensor cores) at
# SD1.5/SDXL shapes, and no GPU run has measured it (bench/RESULTS.md). Add "cuda" only together with
# a recorded bench/gpu_check.sh output folder whose dual_attention rows show the fused op faster
# forward+backward at those shapes.
AUTO_FUSED_DEVICE_TYPES = frozenset({"cpu"})


def resolve_attention(mode: str, device: torch.device | str) -> str:
    """The attention path a processor takes for `mode` on `device`: "sdpa" or "fused".

    "sdpa" and "fused" are taken as given (fused still falls back to SDPA for inputs the op does not
    support); "auto" is "fused" on the device types in AUTO_FUSED_DEVICE_TYPES (CPU, where it was
    measured faster) and "sdpa" elsewhere, CUDA included."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention={mode!r}; expected one of {ATTENTION_MODES}")
    if mode == "auto":
        return "fused" if torch.device(device).type in AUTO_FUSED_DEVICE_TYPES else "sdpa"
    return mode


_FUSED: dict = {}


def _import_fused():
    """((dual_cross_attention, dual_attention_supported), None), or (None, the ImportError).

    The module is imported once (a failing import is not retried per call); its functions are read
    at each call so that tests can wrap them."""
    if not _FUSED:
        try:
            import ppd_engine.ops.dual_attention as module
            _FUSED["module"] = module
        except ImportError as exc:  # the op wrapper is absent: the SDPA path is always correct
            _FUSED["error"] = exc
    module = _FUSED.get("module")
    if module is None:
        return None, _FUSED["error"]
    return (module.dual_cross_attention, module.dual_attention_supported), None


class UserState:
    """What the processors of one model read at call time.

    tokens: (R, N, token_dim) user tokens or None (branch off); R = the model batch, or 1
        (broadcast), or, only when `prefix_rows` is set (stacked paired forward), R < batch: the
        branch then runs for the first R rows only and the rest (reference rows) skip it.
    gate:   (R,) per-row scale (already multiplied by the adapters' `scale`).
    text_cache: dict processor -> (K, V) while a paired forward shares text K/V, else None.
    text_rows:  number of distinct caption rows Bt; query row b uses text row b % Bt.
    """

    def __init__(self, attention: str = "sdpa"):
        self.tokens: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.text_cache: dict | None = None
        self.text_rows: int | None = None
        self.prefix_rows = False
        self.attention = attention
        self.replay: _Inputs | None = None

    def inputs(self) -> "_Inputs":
        """The inputs a processor call uses.

        Gradient checkpointing re-runs the processors during backward, after `user_conditioning`
        (and paired_forward's cache) have exited; the re-run must see what the original forward
        saw, or autograd would rebuild a different graph. So every grad-enabled forward call
        records its inputs, and calls made during backward replay the latest record. (Hence: with
        gradient checkpointing, run backward before the next conditioned grad-enabled forward of
        the same model, as any forward-backward loop does.)"""
        if torch._C._current_graph_task_id() != -1 and self.replay is not None:
            return self.replay
        live = _Inputs(self.tokens, self.gate, self.prefix_rows, self.text_cache, self.text_rows)
        if torch.is_grad_enabled():
            self.replay = live
        return live


class _Inputs(NamedTuple):
    tokens: torch.Tensor | None
    gate: torch.Tensor | None
    prefix_rows: bool
    text_cache: dict | None
    text_rows: int | None


class UserCrossAttnProcessor(nn.Module):
    """Processor for one `diffusers.models.attention_processor.Attention` with a user branch.

    Parameters: to_k_ip, to_v_ip: Linear(token_dim -> inner_dim of the layer's K/V), no bias
    (IP-Adapter's names and shapes, so they export verbatim)."""

    def __init__(self, attn: nn.Module, token_dim: int, state: UserState, cache_text_kv: bool):
        super().__init__()
        inner = attn.to_k.out_features
        self.to_k_ip = nn.Linear(token_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(token_dim, inner, bias=False)
        with torch.no_grad():
            if attn.to_k.weight.shape == self.to_k_ip.weight.shape:
                self.to_k_ip.weight.copy_(attn.to_k.weight)
            self.to_v_ip.weight.zero_()
        # Plain attributes (not submodules/buffers): shared, and not part of the state dict.
        self.__dict__["state"] = state
        self.cache_text_kv = cache_text_kv

    # -- pieces -----------------------------------------------------------------------------
    def _text_kv(self, attn, encoder_hidden_states: torch.Tensor, inputs: _Inputs):
        if inputs.text_cache is None or not self.cache_text_kv:
            return attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        entry = inputs.text_cache.get(self)
        if entry is None:
            src = encoder_hidden_states[: inputs.text_rows or encoder_hidden_states.shape[0]]
            entry = (attn.to_k(src), attn.to_v(src))
            inputs.text_cache[self] = entry
        return entry

    def _user_kv(self, attn, tokens: torch.Tensor, head_dim: int, dtype: torch.dtype):
        tokens = tokens.to(dtype=self.to_k_ip.weight.dtype)
        k = self.to_k_ip(tokens).to(dtype)
        v = self.to_v_ip(tokens).to(dtype)
        rows = tokens.shape[0]
        k = k.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        v = v.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        return k, v

    def _fused(self, device: torch.device):
        if resolve_attention(self.state.attention, device) == "sdpa":
            return None
        fns, _ = _import_fused()
        return fns

    # -- the call: diffusers' AttnProcessor2_0, plus the user term before to_out -------------
    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        state = self.state
        inputs = state.inputs()
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        channel = height = width = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key, value = self._text_kv(attn, encoder_hidden_states, inputs)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(key.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(value.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        tokens = inputs.tokens
        if tokens is not None and tokens.shape[0] != batch_size:
            if tokens.shape[0] == 1:
                tokens = tokens.expand(batch_size, -1, -1)
            elif not (inputs.prefix_rows and tokens.shape[0] < batch_size):
                raise ValueError(f"user_embeds has {tokens.shape[0]} rows but the model was called with a batch "
                                 f"of {batch_size}")
        rows = 0 if tokens is None else tokens.shape[0]

        fused = self._fused(query.device) if rows and attention_mask is None else None
        if fused is not None:
            k_user, v_user = self._user_kv(attn, tokens, head_dim, query.dtype)
            gate = inputs.gate
            if rows < batch_size:  # stacked paired batch: reference rows get gate 0 (and zero user K/V)
                pad = (0, 0, 0, 0, 0, 0, 0, batch_size - rows)
                k_user, v_user = F.pad(k_user, pad), F.pad(v_user, pad)
                gate = F.pad(gate.expand(rows), (0, batch_size - rows))
            dual, supported = fused
            if supported(query, key, k_user):
                hidden_states = dual(query, key, value, k_user, v_user, gate)
                hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
                hidden_states = hidden_states.to(query.dtype)
                return self._finish(attn, hidden_states, residual, (batch_size, channel, height, width))

        if key.shape[0] != batch_size:  # cached text K/V of the Bt distinct captions
            key = key.repeat(batch_size // key.shape[0], 1, 1, 1)
            value = value.repeat(batch_size // value.shape[0], 1, 1, 1)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if rows:
            k_user, v_user = self._user_kv(attn, tokens, head_dim, query.dtype)
            q_user = query if rows == batch_size else query[:rows]
            user = F.scaled_dot_product_attention(q_user, k_user, v_user, attn_mask=None, dropout_p=0.0,
                                                  is_causal=False)
            user = user.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
            user = inputs.gate.to(query.dtype).view(-1, 1, 1) * user
            if rows == batch_size:
                hidden_states = hidden_states + user
            else:
                hidden_states = torch.cat([hidden_states[:rows] + user, hidden_states[rows:]])

        return self._finish(attn, hidden_states, residual, (batch_size, channel, height, width))

    @staticmethod
    def _finish(attn, hidden_states, residual, shape4d):
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape4d[1] is not None:  # the input was (B, C, H, W)
            hidden_states = hidden_states.transpose(-1, -2).reshape(*shape4d)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
