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
in_tokens=1 and num_tokens=4 (diffusers rebuilds ImageProjection with 4 tokens), or
projection="resampler" with depth=4 and dim_head=64 (rebuilt as IPAdapterPlusImageProjection).
Stock diffusers applies the user branch with scale 1 (change with `pipe.set_ip_adapter_scale`).
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

_META_KEY = "ppd_user_adapters"
log = logging.getLogger(__name__)


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
        log.warning("%s records no '%s' (written by an older ppd_engine); not verified", path, TENSORS_SHA256)
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


def export_ip_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters of a UNet2DConditionModel in diffusers' IP-Adapter layout to `path`.

    Load in stock diffusers with
        pipe.load_ip_adapter(folder, subfolder="", weight_name=name, image_encoder_folder=None)
    and generate for ONE user per call (stock pipelines repeat the IP-Adapter input over the
    prompts) with `ip_adapter_image_embeds=[u[:, None]]`, u: (1, user_dim) or (1, 1, user_dim)
    for "linear", (1, T_in, user_dim) for "resampler"; under classifier-free guidance stack the
    negative user first: `[torch.cat([u_neg, u])[:, None]]`. Raises ValueError for a model or
    projection the layout cannot express (see the module docstring)."""
    handle = get_user_adapters(model)
    cfg = handle.config
    if cfg["family"] != "unet2d":
        raise ValueError(f"IP-Adapter export exists for UNet2DConditionModel only; this is {cfg['model_class']}")
    proj_sd = {k: v.detach().cpu().contiguous() for k, v in handle.projection.state_dict().items()}
    if cfg["projection"] == "linear":
        if cfg["in_tokens"] != 1 or cfg["num_tokens"] != 4:
            raise ValueError("export of the linear projection needs in_tokens=1 and num_tokens=4 (diffusers rebuilds "
                             f"ImageProjection with 4 tokens from one vector); got in_tokens={cfg['in_tokens']}, "
                             f"num_tokens={cfg['num_tokens']}")
        image_proj = proj_sd
    else:
        hp = cfg["resampler"]
        if hp["depth"] != 4 or hp["dim_head"] != 64:
            raise ValueError(f"export of the resampler needs depth=4 and dim_head=64 (what diffusers rebuilds); "
                             f"got depth={hp['depth']}, dim_head={hp['dim_head']}")
        image_proj = _resampler_to_original(proj_sd)

    tensors = {f"image_proj.{k}": v for k, v in image_proj.items()}
    blocks = list(model.config.block_out_channels)
    key_id = 1
    exported = set()
    for name in model.attn_processors:
        if name.startswith(PROJECTION_NAME + ".") or name.endswith("attn1.processor"):
            continue
        module = name[: -len(".processor")]
        if module not in handle.processors:
            raise ValueError(f"diffusers' loader expects an IP-Adapter layer at {module}, which has no user branch")
        proc = handle.processors[module]
        # The hidden size diffusers' loader assumes for this layer; a model whose attention width
        # differs from its block width cannot be expressed in this layout.
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = blocks[::-1][int(name.split(".")[1])]
        else:
            hidden = blocks[int(name.split(".")[1])]
        if proc.to_k_ip.out_features != hidden:
            raise ValueError(f"{module}: attention width {proc.to_k_ip.out_features} != block width {hidden}; "
                             "diffusers' IP-Adapter loader cannot rebuild it")
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip.weight.detach().cpu().contiguous()
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip.weight.detach().cpu().contiguous()
        exported.add(module)
        key_id += 2
    if exported != set(handle.processors):
        raise ValueError(f"layers with a user branch that the IP-Adapter layout cannot hold: "
                         f"{sorted(set(handle.processors) - exported)}")
    save_safetensors_atomic(tensors, path, {"format": "pt", "source": "ppd_engine.export_ip_adapter",
                                            TENSORS_SHA256: tensors_sha256(tensors)})
