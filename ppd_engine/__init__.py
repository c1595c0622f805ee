"""ppd_engine: Personalized Preference fine-tuning of Diffusion models (PPD) with fused C++/CUDA ops.

    import ppd_engine as ppd
    out = ppd.preference_loss("dpo", model_pred, ref_pred, target, beta=5000.0)
    ppd.add_user_adapters(unet, user_dim=896); policy, ref = ppd.paired_forward(unet, ...)
    ppd.Trainer(cfg, model, dataset, embeddings, run_dir).fit()

The names below are imported on first use (PEP 562), so `import ppd_engine` stays cheap and pulls
in neither diffusers nor the compiled extension until something needs them.
"""

import logging as _logging

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "preference_loss": "ppd_engine.losses", "register_loss": "ppd_engine.losses", "LOSSES": "ppd_engine.losses",
    "PreferenceOutput": "ppd_engine.losses",
    "add_user_adapters": "ppd_engine.adapters", "user_conditioning": "ppd_engine.adapters",
    "save_user_adapters": "ppd_engine.adapters", "load_user_adapters": "ppd_engine.adapters",
    "export_ip_adapter": "ppd_engine.adapters",
    "paired_forward": "ppd_engine.paired",
    "Trainer": "ppd_engine.training", "TrainResult": "ppd_engine.training", "load_run": "ppd_engine.training",
    "load_config": "ppd_engine.config", "Config": "ppd_engine.config", "ConfigError": "ppd_engine.config",
    "DiffusionModel": "ppd_engine.models", "build_model": "ppd_engine.models",
    "register_family": "ppd_engine.models", "FAMILIES": "ppd_engine.models",
    "World": "ppd_engine.world", "WorldParts": "ppd_engine.world", "register_world": "ppd_engine.world",
    "WORLDS": "ppd_engine.world",
    "generate": "ppd_engine.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ppd_engine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _DropUnused4bitWarning(_logging.Filter):
    """bitsandbytes warns, on every import through diffusers/transformers, that its CPU 4-bit matmul
    kernel is missing; the engine uses its 8-bit AdamW only, so the warning is noise on every command."""

    def filter(self, record):
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropUnused4bitWarning())
