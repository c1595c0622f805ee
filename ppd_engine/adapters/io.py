"""Adapter files: our own format (save/load) and diffusers' IP-Adapter layout (export).

Our format: one safetensors file; tensors under the model-level parameter names
(`ppd_user_proj.*`, `<attention>.processor.to_k_ip.weight`, ...); the adapter config as JSON in
the metadata key "ppd_user_adapters" and the sha256 of the tensors (integrity.tensors_sha256) in
"ppd_tensors_sha256", checked on load (the exported IP-Adapter file records it too;
`check_tensor_hash` verifies either). Files are written to a temporary name and renamed.

IP-Adapter export (UNet2DConditionModel only): `image_proj.*` in IP-Adapter's original key
naming (which diffusers' `_convert_ip_adapter_image_proj_to_diffusers` converts) and
`ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`, numbered the way diffusers' loader walks
`unet.attn_processors` (odd ids = the cross-attentions). Exportable: projection="linear" with
num_tokens=4 (diffusers rebuilds ImageProjection with 4 tokens) and any in_tokens (the learned
layer mix is folded into one ImageProjection over the flattened T_in * user_dim input), or
projection="resampler" with depth=4, dim_head=64, ffn_ratio=4 (rebuilt as
IPAdapterPlusImageProjection). The training scale is folded into `to_v_ip`, so stock diffusers'
IP-Adapter scale 1 is the trained strength (`pipe.set_ip_adapter_scale` multiplies it).
"""
from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ppd_engine.files import save_safetensors_atomic
from ppd_engine.integrity import TENSORS_SHA256, tensors_sha256

from .families import PROJECTION_NAME
from .handle import UserAdapters, add_user_adapters, get_user_adapters

logger = logging.getLogger(__name__)

_META_KEY = "ppd_user_adapters"


class AdapterFileError(ValueError):
    """An adapter file that cannot be used with this model: unreadable, or keys/shapes/config differ."""



def save_user_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter weights of `model` and their config to `path` (safetensors, atomic)."""
    handle = get_user_adapters(model)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in handle.named_parameters()}
    save_safetensors_atomic(tensors, path, {_META_KEY: json.dumps(handle.config),
                                            TENSORS_SHA256: tensors_sha256(tensors)})


def _open(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, or AdapterFileError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file (corrupted or truncated?): {exc}") from exc


def _check_hash(path: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    if TENSORS_SHA256 not in meta:
        # Files written before the hash was recorded still load (as checkpoints without hashes do).
        logger.warning("%s records no '%s' (written by an older ppd_engine); not verified", path, TENSORS_SHA256)
        return
    if tensors_sha256(tensors) != meta[TENSORS_SHA256]:
        raise AdapterFileError(f"{path}: tensor data does not match its sha256 (corrupted file)")


def check_tensor_hash(path: str | os.PathLike) -> None:
    """Verify a file written by save_user_adapters or export_ip_adapter against the tensor hash in
    its metadata; AdapterFileError naming the file on a mismatch."""
    path = os.fspath(path)
    _check_hash(path, *_open(path))


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    path = os.fspath(path)
    meta, tensors = _open(path)
    if _META_KEY not in meta:
        raise AdapterFileError(f"{path} has no '{_META_KEY}' metadata: not a file written by save_user_adapters")
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: the '{_META_KEY}' metadata is not valid JSON ({exc})") from exc
    return config, tensors, meta


def read_user_adapters(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a file written by `save_user_adapters`, without a model; the tensors
    are verified against the hash the file records."""
    config, tensors, meta = _read(path)
    _check_hash(os.fspath(path), meta, tensors)
    return config, tensors


def load_user_adapters(model: nn.Module, path: str | os.PathLike) -> UserAdapters:
    """Load adapters saved by `save_user_adapters` into `model` and return the handle.

    On a model without adapters, they are first added with the file's config; on a model that
    has them, the config must agree. Strict: any missing or unexpected key or shape mismatch
    raises AdapterFileError naming the key and both shapes; nothing is copied in that case."""
    config, tensors, meta = _read(path)
    if config.get("model_class") != type(model).__name__:
        raise AdapterFileError(f"{path} holds adapters for {config.get('model_class')}, not {type(model).__name__}")
    handle = getattr(model, "_ppd_user_adapters", None)
    if handle is None:
        try:
            handle = add_user_adapters(
                model, user_dim=config["user_dim"], num_tokens=config["num_tokens"],
                projection=config["projection"], scale=config["scale"], dropout=config["dropout"],
                in_tokens=config["in_tokens"], attention=config["attention"],
                resampler={k: v for k, v in (config.get("resampler") or {}).items()} or None,
                dtype=getattr(torch, config.get("dtype", ""), None))
        except KeyError as exc:
            raise AdapterFileError(f"{path}: adapter config lacks {exc}") from exc
    for key in ("user_dim", "num_tokens", "in_tokens", "projection", "token_dim"):
        if handle.config.get(key) != config.get(key):
            raise AdapterFileError(f"{path}: config {key}={config.get(key)!r} but the model's adapters have "
                                   f"{key}={handle.config.get(key)!r}")
    if list(config.get("modules", [])) != list(handle.config["modules"]):
        missing = sorted(set(handle.config["modules"]) - set(config.get("modules", [])))
        extra = sorted(set(config.get("modules", [])) - set(handle.config["modules"]))
        raise AdapterFileError(f"{path}: patched modules differ; not in file: {missing}; not in model: {extra}")

    params = dict(handle.named_parameters())
    for key, p in params.items():
        if key not in tensors:
            raise AdapterFileError(f"{path}: missing key {key!r} (model expects shape {tuple(p.shape)})")
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise AdapterFileError(f"{path}: shape mismatch for {key!r}: file has {tuple(tensors[key].shape)}, "
                                   f"model expects {tuple(p.shape)}")
    for key, t in tensors.items():
        if key not in params:
            raise AdapterFileError(f"{path}: unexpected key {key!r} with shape {tuple(t.shape)} (not in the model)")
    _check_hash(os.fspath(path), meta, tensors)  # after the named key/shape checks, before any copy
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    handle.config["scale"] = float(config.get("scale", handle.config["scale"]))
    handle.config["dropout"] = float(config.get("dropout", handle.config["dropout"]))
    return handle


# ---- IP-Adapter export ----------------------------------------------------------------------

def _resampler_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers IPAdapterPlusImageProjection keys -> IP-Adapter Plus original keys (the inverse of
    diffusers' conversion): attention at `layers.i.0`, feed-forward at `layers.i.1`, to_kv fused."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:  # latents, proj_in, proj_out, norm_out
            out[key] = value
            continue
        i, rest = m.groups()
        renames = {"ln0.weight": "0.norm1.weight", "ln0.bias": "0.norm1.bias", "ln1.weight": "0.norm2.weight",
                   "ln1.bias": "0.norm2.bias", "attn.to_q.weight": "0.to_q.weight",
                   "attn.to_out.0.weight": "0.to_out.weight", "ff.0.weight": "1.0.weight", "ff.0.bias": "1.0.bias",
                   "ff.1.net.0.proj.weight": "1.1.weight", "ff.1.net.2.weight": "1.3.weight"}
        if rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, sd[f"layers.{i}.attn.to_v.weight"]], 0)
        elif rest == "attn.to_v.weight":
            continue
        elif rest in renames:
            out[f"layers.{i}.{renames[rest]}"] = value
        else:
            raise AdapterFileError(f"resampler key {key!r} has no IP-Adapter Plus equivalent")
    return out


def _linear_to_image_projection(cfg: dict, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LinearProjection -> IP-Adapter's ImageProjection keys (`proj`, `norm`).

    With T_in > 1 tokens the projection is W (sum_t w_t e_t) + b, w = softmax(layer_logits): a linear
    map of the flattened input [e_1, ..., e_T], so it is exactly ImageProjection over T_in * user_dim
    inputs with the weight [w_1 W | ... | w_T W] (equal up to the order of fp32 summation)."""
    if cfg["num_tokens"] != 4:
        raise ValueError("export of the linear projection needs num_tokens=4: diffusers' loader rebuilds "
                         "ImageProjection with 4 tokens whatever the weights hold (cross_attention_dim = "
                         f"rows / 4), so num_tokens={cfg['num_tokens']} would load with the wrong token width")
    out = {"proj.weight": sd["proj.weight"], "proj.bias": sd["proj.bias"], "norm.weight": sd["norm.weight"],
           "norm.bias": sd["norm.bias"]}
    if cfg["in_tokens"] > 1:
        w = torch.softmax(sd["layer_logits"].double(), 0)
        out["proj.weight"] = torch.cat([(wt * sd["proj.weight"].double()).float() for wt in w], dim=1)
    return out


def ip_adapter_state_dict(config: dict, tensors: dict[str, torch.Tensor], unet: nn.Module
                          ) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...}: adapters in diffusers' IP-Adapter layout for `unet`.

    `config`/`tensors`: the adapter config and the model-level parameter names of our format (what
    `save_user_adapters` writes, or `handle.config` / `handle.state_dict()`); `unet`: the base
    UNet2DConditionModel (with or without our processors; only its layout is read). The dict is what
    `pipe.load_ip_adapter(dict, subfolder="", weight_name="", image_encoder_folder=None)` takes. The
    adapters' training scale s is folded into `to_v_ip` (the user term is linear in V), so stock
    diffusers' default IP-Adapter scale 1.0 is the trained strength. Raises ValueError saying why a
    configuration cannot be expressed in that layout."""
    if config.get("family") != "unet2d":
        raise ValueError(f"IP-Adapter export exists for UNet2DConditionModel only (diffusers loads IP-Adapters "
                         f"into that class alone); these adapters are for {config.get('model_class')}")
    prefix = PROJECTION_NAME + "."
    proj_sd = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in tensors.items() if k.startswith(prefix)}
    if config["projection"] == "linear":
        image_proj = _linear_to_image_projection(config, proj_sd)
    else:
        hp = config["resampler"]
        wanted = {"depth": 4, "dim_head": 64, "ffn_ratio": 4}
        bad = {k: hp.get(k) for k, v in wanted.items() if hp.get(k) != v}
        if bad:
            raise ValueError("export of the resampler needs depth=4, dim_head=64 and ffn_ratio=4 (what diffusers' "
                             "loader rebuilds IPAdapterPlusImageProjection with); got "
                             + ", ".join(f"{k}={v}" for k, v in bad.items()))
        image_proj = _resampler_to_original(proj_sd)

    scale = float(config.get("scale", 1.0))
    blocks = list(unet.config.block_out_channels)
    layers: dict[str, torch.Tensor] = {}
    key_id = 1
    exported = []
    for name in unet.attn_processors:
        if name.startswith(prefix) or name.endswith("attn1.processor"):
            continue
        module = name[: -len(".processor")]
        k_key, v_key = f"{module}.processor.to_k_ip.weight", f"{module}.processor.to_v_ip.weight"
        if k_key not in tensors:
            raise ValueError(f"diffusers' loader expects an IP-Adapter layer at {module}, which has no user branch")
        # The hidden size diffusers' loader assumes for this layer; a model whose attention width
        # differs from its block width cannot be expressed in this layout.
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = blocks[::-1][int(name.split(".")[1])]
        else:
            hidden = blocks[int(name.split(".")[1])]
        if tensors[k_key].shape[0] != hidden:
            raise ValueError(f"{module}: attention width {tensors[k_key].shape[0]} != block width {hidden}; "
                             "diffusers' IP-Adapter loader cannot rebuild it")
        layers[f"{key_id}.to_k_ip.weight"] = tensors[k_key].detach().cpu().contiguous()
        layers[f"{key_id}.to_v_ip.weight"] = (tensors[v_key].detach().cpu() * scale).contiguous()
        exported.append(module)
        key_id += 2
    missing = sorted(set(config.get("modules", [])) - set(exported))
    if missing:
        raise ValueError(f"layers with a user branch that the IP-Adapter layout cannot hold: {missing}")
    return {"image_proj": image_proj, "ip_adapter": layers}


def export_problem(model: nn.Module) -> str | None:
    """Why the adapters of `model` cannot be exported with `export_ip_adapter`, or None when they can."""
    handle = get_user_adapters(model)
    try:
        ip_adapter_state_dict(handle.config, handle.state_dict(), model)
    except (ValueError, KeyError) as exc:
        return str(exc)
    return None


def warn_if_not_exportable(model: nn.Module) -> str | None:
    """Log a warning (and return the reason) when `ppd export` would refuse these adapters; training
    calls it at start-up so the problem shows before the run, not after it."""
    problem = export_problem(model)
    if problem is not None:
        logger.warning("these adapters cannot be exported to diffusers' IP-Adapter layout (ppd export will "
                       "refuse them): %s", problem)
    return problem


def export_ip_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Write the adapters of a UNet2DConditionModel in diffusers' IP-Adapter layout to `path`.

    Load in stock diffusers with
        pipe.load_ip_adapter(folder, subfolder="", weight_name=name, image_encoder_folder=None)
    and pass `ip_adapter_image_embeds=[e]` with e = `ip_adapter_input(u, config, cfg=True)` (the
    flattened (1, T_in * user_dim) vector for "linear", the (T_in, user_dim) tokens for "resampler",
    stacked twice under classifier-free guidance: the engine conditions both text branches on the
    user). Returns the adapter config. Raises ValueError for a model or projection the layout cannot
    express (see `ip_adapter_state_dict`)."""
    handle = get_user_adapters(model)
    sd = ip_adapter_state_dict(handle.config, handle.state_dict(), model)
    write_ip_adapter(sd, handle.config, path)
    return handle.config


def write_ip_adapter(sd: dict[str, dict[str, torch.Tensor]], config: dict, path: str | os.PathLike) -> None:
    """Save an `ip_adapter_state_dict` as one safetensors file (`image_proj.*`, `ip_adapter.*`; atomic)."""
    tensors = {f"{group}.{k}": v for group, part in sd.items() for k, v in part.items()}
    save_safetensors_atomic(tensors, path, {"format": "pt", "source": "ppd_engine.export_ip_adapter",
                                            "ppd_input": input_layout(config), _META_KEY: json.dumps(config),
                                            TENSORS_SHA256: tensors_sha256(tensors)})


def input_layout(config: dict) -> str:
    """How a user embedding (T_in, user_dim) enters the exported projection: "flat" = one vector of
    T_in * user_dim (ImageProjection), "tokens" = T_in tokens (IPAdapterPlusImageProjection)."""
    return "flat" if config["projection"] == "linear" else "tokens"


def ip_adapter_input(user_embeds: torch.Tensor, config: dict, cfg: bool = True) -> torch.Tensor:
    """One user's embedding (T_in, user_dim) -> the tensor a stock pipeline's `ip_adapter_image_embeds`
    list holds for these adapters: (1, 1, T_in * user_dim) ("flat") or (1, 1, T_in, user_dim)
    ("tokens"); with `cfg` (guidance_scale > 1) the same user twice, (2, ...), as the pipelines
    split it into a negative and a positive half and the engine conditions both on the user."""
    e = torch.as_tensor(user_embeds).float()
    t_in_ok = e.dim() == 2 and (config["projection"] != "linear" or e.shape[0] == config["in_tokens"])
    if not t_in_ok or e.shape[-1] != config["user_dim"]:
        t_in = config["in_tokens"] if config["projection"] == "linear" else "T_in"
        raise ValueError(f"a user embedding for these adapters is ({t_in}, {config['user_dim']}); got {tuple(e.shape)}")
    e = e.reshape(1, 1, -1) if input_layout(config) == "flat" else e[None, None]
    return torch.cat([e, e]) if cfg else e
