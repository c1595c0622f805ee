"""User cross-attention adapters (IP-Adapter style) for diffusers denoisers.

    adapters = add_user_adapters(unet, user_dim=896, num_tokens=4)      # in place, base frozen
    with user_conditioning(unet, user_embeds, gate):                     # (B, T_in, user_dim) or None
        pred = unet(latents, t, encoder_hidden_states=text).sample
    save_user_adapters(unet, "user.safetensors"); load_user_adapters(fresh_unet, "user.safetensors")
    export_ip_adapter(unet, "ip_adapter.safetensors")                   # stock diffusers load_ip_adapter

See handle.py (API), attention.py (the processor), projection.py (P), families.py (model families),
io.py (files).
"""
from .attention import UserCrossAttnProcessor, UserState
from .families import call_model, family_of
from .handle import UserAdapters, add_user_adapters, get_user_adapters, user_conditioning
from .io import (AdapterFileError, export_ip_adapter, export_problem, input_layout, ip_adapter_input,
                 ip_adapter_state_dict, load_user_adapters, read_user_adapters, save_user_adapters,
                 warn_if_not_exportable, write_ip_adapter)
from .projection import LinearProjection, Resampler

__all__ = [
    "AdapterFileError", "LinearProjection", "Resampler", "UserAdapters", "UserCrossAttnProcessor", "UserState",
    "add_user_adapters", "call_model", "export_ip_adapter", "export_problem", "family_of", "get_user_adapters",
    "input_layout", "ip_adapter_input", "ip_adapter_state_dict", "load_user_adapters", "read_user_adapters", "save_user_adapters",
    "user_conditioning", "warn_if_not_exportable", "write_ip_adapter",
]
