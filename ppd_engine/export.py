"""`python -m ppd_engine.export` / `ppd export --run RUN [--checkpoint step-N] --out DIR`.

Writes, for stock diffusers:
    DIR/ip_adapter.safetensors   the user adapters in diffusers' IP-Adapter layout
    DIR/users.safetensors        each chosen user's embedding, already shaped for ip_adapter_image_embeds
    DIR/README.md                a model card with the exact loading and generation snippet
A configuration the IP-Adapter layout cannot express is refused, naming why (adapters/io.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ppd_engine.cli.common import UsageError, add_checkpoint, add_debug, cli_errors

WEIGHT_NAME = "ip_adapter.safetensors"
USERS_NAME = "users.safetensors"
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN", help="run folder (RUN/config.yaml, RUN/checkpoints/)")
    add_checkpoint(p)
    p.add_argument("--out", required=True, metavar="DIR", help=f"output folder ({WEIGHT_NAME}, {USERS_NAME}, README.md)")
    users = p.add_mutually_exclusive_group()
    users.add_argument("--users", metavar="NAME,NAME", default=None,
                       help="users of the run's embedding store to export (default: all of them)")
    users.add_argument("--no-users", action="store_true", help="export the adapters only")
    add_debug(p)
    return p


def user_inputs(store, names: list[str], config: dict) -> dict:
    """user id -> its stock-pipeline input (1, 1, D) / (1, 1, T_in, Du): the first of its K embeddings,
    the one `ppd sample --user` uses."""
    from ppd_engine.adapters import ip_adapter_input

    missing = [n for n in names if n not in store]
    if missing:
        raise KeyError(f"--users: {', '.join(missing)} not in {store.path} (users: {', '.join(store.users()[:20])}"
                       f"{' ...' if len(store) > 20 else ''})")
    return {n: ip_adapter_input(store.get(n)[0], config, cfg=False).contiguous() for n in names}


def model_card(cfg, config: dict, run: str, checkpoint: str, users: list[str], defaults: dict) -> str:
    """README.md of an export folder: what it holds and the exact diffusers snippet."""
    from ppd_engine.adapters import input_layout

    pipeline = PIPELINES.get(cfg.model.family)
    shape = "(1, 1, T_in * user_dim)" if input_layout(config) == "flat" else "(1, 1, T_in, user_dim)"
    a, b = (users + ["USER_A", "USER_B"])[:2]
    lines = [
        f"# User adapters exported from `{run}` ({checkpoint})",
        "",
        f"Personalized preference (PPD) user adapters for `{cfg.model.pretrained or cfg.model.family}` in "
        "diffusers' IP-Adapter layout: no image encoder; the IP-Adapter input is a user embedding.",
        "",
        f"- `{WEIGHT_NAME}`: {config['projection']} projection of a ({config['in_tokens'] if config['projection'] == 'linear' else 'T_in'}, "
        f"{config['user_dim']}) user embedding to {config['num_tokens']} tokens, user cross-attention on "
        f"{len(config['modules'])} layers; the training scale {config['scale']:g} is folded into the weights "
        "(IP-Adapter scale 1 = as trained).",
        f"- `{USERS_NAME}`: {len(users)} user(s), each a tensor {shape} ready for `ip_adapter_image_embeds`"
        + (f" ({', '.join(users[:8])}{' ...' if len(users) > 8 else ''})." if users else "."),
        "",
        f"The run sampled with guidance {defaults['guidance']:g}, {defaults['steps']} steps and DDIM with "
        "trailing timestep spacing; the snippet uses the same. Classifier-free guidance conditions both "
        "halves on the user (the engine's convention), hence the user twice.",
        "",
    ]
    if pipeline is None:
        lines += [f"The base is model.family={cfg.model.family!r}, which has no stock diffusers pipeline; load "
                  f"`{WEIGHT_NAME}` into its UNet2DConditionModel with `unet._load_ip_adapter_weights`.", ""]
        return "\n".join(lines)
    # The stock SDXL pipeline zeroes the negative text embedding for an absent negative prompt; the
    # engine trained (caption dropout) and samples with the empty caption's encoding.
    neg = 'negative_prompt="", ' if cfg.model.family == "sdxl" else ""
    lines += [
        "```python",
        "import torch",
        f"from diffusers import DDIMScheduler, {pipeline}",
        "from safetensors.torch import load_file",
        "",
        f'pipe = {pipeline}.from_pretrained("{cfg.model.pretrained}")',
        'pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", '
        'set_alpha_to_one=False)',
        f'pipe.load_ip_adapter("DIR", subfolder="", weight_name="{WEIGHT_NAME}", image_encoder_folder=None)',
        f'users = load_file("DIR/{USERS_NAME}")',
        "",
        f'u = users["{a}"]',
        f'image = pipe("a photo of a cat", {neg}ip_adapter_image_embeds=[torch.cat([u, u])], '
        f'guidance_scale={defaults["guidance"]:g}, num_inference_steps={defaults["steps"]}).images[0]',
        "",
        f'mix = 0.7 * users["{a}"] + 0.3 * users["{b}"]   # a mix of two users',
        f'image = pipe("a photo of a cat", {neg}ip_adapter_image_embeds=[torch.cat([mix, mix])], '
        f'guidance_scale={defaults["guidance"]:g}, num_inference_steps={defaults["steps"]}).images[0]',
        "```",
        "",
        "Replace DIR with this folder. With guidance_scale <= 1 pass `[u]` instead of `[torch.cat([u, u])]`; "
        "`pipe.set_ip_adapter_scale(x)` scales the user branch.",
        "",
    ]
    if defaults["user_guidance"]:
        lines += [f"The run also used user guidance {defaults['user_guidance']:g} (a third branch with the zero "
                  "embedding), which stock pipelines do not have; `ppd sample` applies it.", ""]
    return "\n".join(lines)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ppd_engine.worlds  # noqa: F401  (a run of any world can be exported)
    from ppd_engine.adapters import export_ip_adapter
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.files import save_safetensors_atomic, write_text_atomic
    from ppd_engine.training import load_run
    from ppd_engine.training.run import embedding_store_path, sampling_defaults

    if args.users is not None and not [n for n in args.users.split(",") if n.strip()]:
        raise UsageError("--users needs at least one NAME")
    cfg, model = load_run(args.run, checkpoint=args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = export_ip_adapter(model.unet, out / WEIGHT_NAME)
    names: list[str] = []
    if not args.no_users:
        try:
            store = EmbeddingStore(str(embedding_store_path(args.run, cfg)))
        except FileNotFoundError:
            if args.users is not None:
                raise
            store = None
            print("no user-embedding store in the run: exported the adapters only", file=sys.stderr)
        if store is not None:
            names = [n.strip() for n in args.users.split(",")] if args.users else store.users()
            save_safetensors_atomic(user_inputs(store, names, config), out / USERS_NAME,
                                    {"source": f"{args.run} ({store.path})"})
    card = model_card(cfg, config, str(args.run), args.checkpoint, names, sampling_defaults(cfg))
    write_text_atomic(out / "README.md", card)
    print(f"exported {args.run} ({args.checkpoint}) -> {out}: {WEIGHT_NAME}, {len(names)} user(s), README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
