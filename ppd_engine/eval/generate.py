"""Image generation for evaluation: every checkpoint x every user x every prompt, same seeds.

Layout: `OUT/<checkpoint>/<user dir>/<index>.png`, where index is the prompt's position and the
seed is `seed + index` for every checkpoint and user, so index i of two checkpoints is a paired
sample. Existing PNGs are kept (an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ppd_engine.files import save_image_atomic


BASE = "base"   # `--run NAME=base`: the frozen base model without adapters


@dataclass
class CheckpointSpec:
    name: str
    run_dir: str
    # False = trained non-personalized (Diffusion-DPO baseline): sampled with the zero user embedding
    # it was trained with, not the user's embedding.
    personalized: bool = True
    # which checkpoint of the run: latest | step-N | a step-N folder (ppd_engine.training.checkpoint)
    checkpoint: str = "latest"
    # base (no adapters) | ppd | dpo (non-personalized) | sft | sft-personalized, from the run's record
    kind: str = "ppd"
    # the user's parsed profile is appended to every caption (the prompted-base baseline)
    caption_profile: bool = False

    @property
    def is_base(self) -> bool:
        return self.kind == BASE


def parse_checkpoints(specs: Sequence[str], no_user: Sequence[str] = (), checkpoint: str = "latest",
                      caption_profile: Sequence[str] = ()) -> list[CheckpointSpec]:
    """`NAME=RUN_DIR`, `NAME=base` or `RUN_DIR` (name = folder name) -> specs; names must be unique
    and safe. `checkpoint` (latest | step-N | folder) is the checkpoint of each run to evaluate;
    `caption_profile` names the checkpoints sampled with the user's profile appended to the caption."""
    out, seen = [], set()
    for spec in specs:
        name, sep, run_dir = spec.partition("=")
        if not sep:
            run_dir, name = spec, Path(spec.rstrip("/")).name
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
            raise ValueError(f"checkpoint name {name!r} (from {spec!r}) must match [A-Za-z0-9._-]+")
        if name in seen:
            raise ValueError(f"checkpoint name {name!r} given twice; use NAME=RUN_DIR to rename")
        seen.add(name)
        out.append(CheckpointSpec(name, run_dir, checkpoint=checkpoint))
    for flag, names in (("--no-user", no_user), ("--caption-profile", caption_profile)):
        unknown = set(names) - seen
        if unknown:
            raise ValueError(f"{flag} names unknown checkpoint(s) {sorted(unknown)}; known: {sorted(seen)}")
    for c in out:
        c.caption_profile = c.name in set(caption_profile)
        if c.run_dir == BASE:
            c.kind, c.personalized = BASE, False
            continue
        c.personalized = c.name not in set(no_user) and run_is_personalized(c.run_dir)
        c.kind = run_kind(c.run_dir, c.personalized)
    return out


def run_is_personalized(run_dir: str) -> bool:
    """What the run's latest checkpoint recorded (state.json "personalized"); runs written before
    the trainer recorded it count as personalized, so --no-user is still needed for those."""
    from ppd_engine.training.checkpoint import latest_checkpoint, read_json

    ckpt = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if ckpt is None or not (ckpt / "state.json").is_file():
        return True
    return bool(read_json(ckpt / "state.json").get("personalized", True))


def run_kind(run_dir: str, personalized: bool) -> str:
    """ppd | dpo (non-personalized) | sft | sft-personalized, from the run's recorded config and state."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    loss = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("loss", {}).get("name") if p.is_file() else None
    if loss == "sft":
        return "sft-personalized" if personalized else "sft"
    return "ppd" if personalized else "dpo"


def user_dir(user_id: str) -> str:
    """A filesystem-safe folder name for a user id (ids with other characters get a hash suffix)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", user_id)
    if safe != user_id or safe in ("", ".", ".."):
        import hashlib
        safe = f"{safe}-{hashlib.sha1(user_id.encode()).hexdigest()[:8]}"
    return safe


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) floats in [0, 1] -> N RGB PIL images (rounded, clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_path(out_dir: str | os.PathLike, checkpoint: str, user: str, index: int) -> Path:
    return Path(out_dir) / checkpoint / user_dir(user) / f"{index}.png"


def user_condition(embeds: torch.Tensor, embed_index: int, n: int) -> torch.Tensor:
    """One of a user's K stored embeddings (K, T_in, Du), repeated to (n, T_in, Du)."""
    if embeds.ndim != 3:
        raise ValueError(f"user embeddings must be (K, T_in, Du), got {tuple(embeds.shape)}")
    k = embeds.shape[0]
    if not -k <= embed_index < k:
        raise ValueError(f"--embed-index {embed_index} out of range for a user with {k} embeddings")
    e = embeds[embed_index].float()
    return e.unsqueeze(0).expand(n, *e.shape).contiguous()


def adapter_input_shape(model) -> tuple[int, int] | None:
    """(T_in, Du) the checkpoint's user adapters take, or None for a unet without adapters."""
    from ppd_engine.adapters import get_user_adapters

    try:
        cfg = get_user_adapters(model.unet).config
    except ValueError:
        return None
    return int(cfg["in_tokens"]), int(cfg["user_dim"])


GenerateFn = Callable[..., torch.Tensor]


def generate_images(model, generate_fn: GenerateFn, checkpoint: CheckpointSpec, prompts: Sequence[str],
                    users: Sequence[str], embeddings: Callable[[str], torch.Tensor], out_dir: str,
                    seed: int = 0, batch_size: int = 4, embed_index: int = 0,
                    zero_shape: tuple[int, int] | None = None, progress: bool = True,
                    captions: Callable[[str], Sequence[str]] | None = None, **sample_kw) -> dict[str, int]:
    """Generate the missing PNGs of one checkpoint for every user and prompt.

    `generate_fn(model, prompts, user_embeds (B, T_in, Du) | None, seeds, **sample_kw) -> (B, 3, H, W)`
    is `ppd_engine.sampling.generate`; `embeddings(user) -> (K, T_in, Du)`. A non-personalized
    checkpoint gets zeros of `zero_shape` (T_in, Du) — the input it was trained with — instead of
    the user's embedding; the base checkpoint gets None (no adapters). `captions(user)` gives that
    user's caption for every prompt (the prompted baseline); None = the prompts themselves.
    Returns counts {"generated", "kept"} (kept = already on disk).
    """
    if not checkpoint.personalized and not checkpoint.is_base and zero_shape is None:
        raise ValueError(f"{checkpoint.name}: a non-personalized checkpoint needs zero_shape (T_in, Du)")
    todo = [(u, i) for u in users for i in range(len(prompts))
            if not image_path(out_dir, checkpoint.name, u, i).is_file()]
    kept = len(users) * len(prompts) - len(todo)
    bar = tqdm(total=len(todo), desc=f"generate {checkpoint.name}", unit="img", disable=not progress)
    for u in users:
        idx = [i for uu, i in todo if uu == u]
        if not idx:
            continue
        embeds = embeddings(u) if checkpoint.personalized else None
        texts = prompts if captions is None else captions(u)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            if checkpoint.is_base:
                cond = None
            elif embeds is None:
                cond = torch.zeros(len(chunk), *zero_shape)
            else:
                cond = user_condition(embeds, embed_index, len(chunk))
            imgs = generate_fn(model, [texts[i] for i in chunk], cond, [seed + i for i in chunk],
                               **sample_kw)
            if imgs.shape[0] != len(chunk):
                raise RuntimeError(f"sampler returned {imgs.shape[0]} images for {len(chunk)} prompts")
            for i, im in zip(chunk, to_pil(imgs)):
                save_image_atomic(im, image_path(out_dir, checkpoint.name, u, i))
            bar.update(len(chunk))
    bar.close()
    return {"generated": len(todo), "kept": kept}


def load_images(out_dir: str, checkpoint: str, user: str, indices) -> list[Image.Image]:
    """The PNGs at `indices` of one checkpoint and user, in that order (a missing one is a clear error)."""
    out = []
    for i in indices:
        p = image_path(out_dir, checkpoint, user, i)
        if not p.is_file():
            raise FileNotFoundError(f"missing image {p} (run the generate step first)")
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out
