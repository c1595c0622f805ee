"""The run configuration's schema: a typed dataclass tree, one section per concern.

Every field carries a `help` string in its metadata; `config_help()` (loader.py) turns them into the
`--help` text, so the documentation cannot drift from the code. The core sections below are
world-independent and their defaults are the paper's recipe (PPD supplementary B.1 +
Diffusion-DPO) for SD1.5 on Pick-a-Pic. A world (ppd_engine.worlds) adds its own section with
`register_section` and its own defaults (a preset that layers under the user's YAML); the core
never imports a world, so `Config` itself holds only the core sections and `config_class()` builds
the root class with every registered section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ppd_engine.dtypes import CANONICAL


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed; the message names the key."""


class DTypeName(str):
    """A dtype spelled through the one dtype table (ppd_engine.dtypes): stored canonical (fp32 |
    bf16 | fp16), aliases such as bfloat16 accepted on input."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (lists/dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


_DTYPE_CHOICES = " | ".join(CANONICAL)


@dataclass
class ModelConfig:
    """The frozen base denoiser (its text encoder(s) and VAE come with it)."""

    family: str = _f("sd15", "model family, one of the registered families (ppd_engine.models.FAMILIES: "
                             "sd15 | sdxl | cascade built in; a world adds its own, e.g. toy). cascade = Stable "
                             "Cascade Stage C (model.pretrained: a StableCascadePriorPipeline folder or hub id, "
                             "model.prior its prior or prior_lite; model.effnet encodes images, model.decoder "
                             "samples; preset cascade_pickapic)")
    pretrained: str = _f("stable-diffusion-v1-5/stable-diffusion-v1-5",
                         "hub id or local diffusers folder of the base pipeline")
    dtype: DTypeName = _f(
        "fp32", f"{_DTYPE_CHOICES}: storage dtype of the FROZEN base weights (adapters are always fp32 masters); "
        "bf16/fp16 need train.mixed_precision=bf16")
    resolution: int = _f(0, "image side in pixels; 0 = the model's default (512 sd15, 1024 sdxl, 768 cascade: "
                            "the EfficientNet input, 24x24 Stage C latents, sampled at 1024 px)")
    prior: str = _f("prior", "cascade: subfolder of model.pretrained holding the Stage C prior: prior (3.6B) | "
                             "prior_lite (1B)")
    effnet: str = _f("", "cascade: local path of Stable Cascade's effnet_encoder.safetensors (the EfficientNet-V2-S "
                         "encoder of the Stage C training latents)")
    decoder: str = _f("", "cascade: StableCascadeDecoderPipeline folder or hub id (decoder/ vqgan/ text_encoder/ "
                          "tokenizer/ scheduler/) that turns Stage C latents into images when sampling")


@dataclass
class DataConfig:
    """Pick-a-Pic pairs (world=pickapic) and the user-embedding store."""

    folder: str = _f("", "where the pairs are (world=pickapic): a folder of (or one) parquet file(s), a Hugging "
                         "Face `datasets` save_to_disk folder, an fsspec URL of parquet files (hf://, s3://; read "
                         "in place) or a hub dataset id owner/name (datasets.load_dataset); Pick-a-Pic v2's "
                         "schema, or with data.format=columns the user's own columns")
    format: Literal["pickapic", "columns"] = _f(
        "pickapic", "pickapic (Pick-a-Pic v2's schema) | columns (a user's own columns, mapped by data.columns)")
    columns: dict[str, str] = _f({}, "data.format=columns: user column of each field: prompt, image_0 + image_1 "
                                     "(bytes or paths relative to the parquet file) with label (index of the "
                                     "preferred image) or label_0 [+ label_1] (scores), or chosen + rejected; "
                                     "optional user_id (without it: non-personalized training); e.g. "
                                     "data.columns.prompt=text")
    min_pairs_per_user: int = _f(4, "users with fewer labelled pairs are dropped (paper: N = 4)")
    max_users: int = _f(0, "keep the users with the most pairs; 0 = all")
    n_shots: int = _f(4, "few-shot pairs per user that build its embedding; held out of its training pairs")
    unseen_fraction: float = _f(0.1, "fraction of users held out entirely (never trained on)")
    split_seed: int = _f(0, "seed of the few-shot and seen/unseen splits")
    embeddings: str = _f("", "user-embedding store folder (python -m ppd_engine.embed) with user_id -> (K, T_in, Du)")
    split: str = _f("train", "split trained on: hub-named parquet files <split>-NNNNN-of-NNNNN-*.parquet, a "
                             "DatasetDict folder's or a hub dataset's split (Pick-a-Pic: train | validation | "
                             "test | validation_unique | test_unique); with data.format=columns, files whose "
                             "names carry no split are all read")
    streaming: bool = _f(False, "a hub id in data.folder is read in place from the hub's parquet files "
                                "(hf://datasets/ID, row groups fetched as needed) instead of downloaded by "
                                "datasets.load_dataset")
    workers: int = _f(0, "DataLoader processes reading training items ahead of the step (0 = in the training "
                         "process; 4-8 on real runs)")
    prefetch: int = _f(2, "steps each data.workers process reads ahead")


@dataclass
class CacheConfig:
    """On-disk latent + text cache (the VAE and text encoders run once, never in the step)."""

    dir: str = _f("cache", "folder of the latent/text cache (shared between runs; hash-checked)")
    batch_size: int = _f(8, "images encoded per VAE call while building the cache")
    flip: bool = _f(True, "also cache horizontally flipped latents; a pair is flipped (both images) with p = 1/2")
    dtype: DTypeName = _f("fp16", f"{_DTYPE_CHOICES}: storage dtype of cached latents/text states")
    verify: bool = _f(True, "hash every cache shard against its recorded sha256 before training, refusing a corrupt "
                            "one (the ranks split the shards: each reads 1/world_size of the cache, ~1.8 GB/s "
                            "per core; false skips it)")


@dataclass
class AdaptersConfig:
    """The added user cross-attention layers (the only trained weights)."""

    user_dim: int = _f(0, "width Du of the user embedding; 0 = read it from the embeddings")
    num_tokens: int = _f(4, "user tokens the projection makes from one embedding")
    projection: str = _f("linear", "embedding -> tokens projection: linear | resampler")
    scale: float = _f(1.0, "scale s of the user attention branch during training")
    attention: Literal["sdpa", "fused", "auto"] = _f(
        "sdpa", "user cross-attention kernel: sdpa (two SDPA calls, bit-exact base path) | fused (the "
        "ppd::dual_cross_attention op) | auto (fused where the op supports the shapes); see bench/RESULTS.md")


@dataclass
class LossConfig:
    """The preference loss (ppd_engine.losses registry)."""

    name: str | list[str] = _f(
        "dpo", "preference loss: any name registered in ppd_engine.losses.LOSSES (listed below), or a list "
               "of names for a weighted mixture (with loss.weights); a user's own loss is registered with "
               "@register_loss in a module named by --import / imports")
    weights: list[float] = _f([], "weights of a mixture's terms (one per loss.name entry); empty = all 1")
    beta: float = _f(5000.0, "beta in the units of loss.beta_units (official: the Diffusion-DPO code's beta_dpo, "
                             "5000 for SD1.5)")
    beta_units: Literal["official", "paper"] = _f(
        "official", "units of loss.beta: official (logit -0.5*beta*delta on per-sample mean MSEs, the Diffusion-DPO "
        "code) | paper (logit -beta*T*w(lambda_t)*delta, T = the scheduler's training timesteps; the PPD paper "
        "tunes it in [0.1, 2]); beta_official = 2*T*beta_paper (ppd_engine.losses.official_beta)")
    weighting: Literal["uniform", "min_snr"] = _f(
        "uniform", "per-pair weight w(lambda_t) of the loss: uniform (w = 1, as Diffusion-DPO trains) | "
        "min_snr (w = min(SNR(t), snr_gamma) / SNR(t), Min-SNR weighting for eps-prediction)")
    snr_gamma: float = _f(5.0, "gamma of the min_snr weighting")
    options: dict[str, Any] = _f({}, "the loss's own options, checked against the options it declares (see the "
                                      "loss list below); set one with loss.options.NAME=value")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = _f(0, "seed of the data order, timesteps, noise and dropouts")
    epochs: int = _f(1, "passes over the training pairs (paper: 1); used when max_steps = 0")
    max_steps: int = _f(0, "optimizer steps to run; 0 = epochs x (pairs // pairs_per_step)")
    pairs_per_step: int = _f(768, "effective batch in preference pairs over all ranks (paper: 768)")
    micro_batch: int = _f(8, "pairs per forward/backward on one rank (gradient accumulation fills the rest)")
    empty_caption_prob: float = _f(0.2, "probability a pair's caption is replaced by the empty caption")
    personalized: bool = _f(True, "false = the non-personalized Diffusion-DPO baseline: the same adapters fed the "
                                  "zero user embedding (recorded in each checkpoint's state.json; eval reads it)")
    user_dropout: float = _f(0.1, "probability a pair's user embedding is zeroed (trains the user-agnostic branch)")
    grad_clip: float = _f(1.0, "max global gradient L2 norm; 0 = no clipping")
    mixed_precision: Literal["no", "bf16", "fp16", "fp32"] = _f(
        "bf16", "compute precision; adapters, loss and reductions stay fp32 in every mode: bf16 = bf16 autocast | "
        "fp16 = fp16 autocast with dynamic loss scaling (GPUs without bf16: V100, T4, RTX 20xx) | no = fp32 "
        "(fp32 is the older spelling of no); accelerate launch --mixed_precision sets it")
    loss_scale_init: float = _f(65536.0, "fp16: the first dynamic loss scale (torch GradScaler's init_scale); it "
                                         "halves on every overflowing step and doubles after 2000 good ones")
    allow_tf32: bool = _f(False, "TF32 matmuls and cuDNN convolutions on Ampere+ GPUs (faster fp32 matmuls, "
                                 "~10-bit mantissa inputs); false = torch's defaults (matmuls off, convolutions on)")
    gradient_checkpointing: bool = _f(True, "recompute UNet activations in backward, as train.checkpoint_policy says")
    checkpoint_policy: Literal["full", "selective", "feedforward"] = _f(
        "feedforward", "with gradient_checkpointing: feedforward (recompute only the transformer blocks' "
        "feed-forwards; CPU bench vs none: 0.74x memory, 1.1x step time) | selective (keep conv/attention outputs, "
        "recompute the rest: 0.55x, 1.4x) | full (recompute whole blocks: 0.39x, 1.5x); see bench/RESULTS.md")
    reference: Literal["online", "cached"] = _f(
        "cached", "reference ε-MSEs: cached (one inference pass before training, stored in reference_dir and "
        "shared by runs with the same base, data, seed and schedule) | online (a reference forward every step); "
        "cached falls back to online, with a log line, where it is not valid (stacked strategy, dspo)")
    reference_dir: str = _f("", "folder of cached reference passes; empty = RUN/../reference (shared by a sweep)")
    reference_batch: int = _f(
        0, "pairs per forward of the reference pass; 0 = micro_batch (the online reference's shapes: bit-identical "
        "MSEs on CPU); larger batches differ by fp32 rounding (halved on CUDA OOM)")
    compile: bool = _f(False, "torch.compile the denoiser in place (training steps and the reference pass)")
    paired_strategy: Literal["sequential", "stacked"] = _f(
        "sequential", "paired forward: sequential (reference then policy) | stacked (one 4B batch)")
    max_bad_steps: int = _f(10, "consecutive NaN/Inf steps tolerated before the run stops")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda | cuda:N")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw8bit", "adamw", "adafactor"] = _f(
        "adamw8bit", "adamw8bit (bitsandbytes AdamW8bit) | adamw (torch) | adafactor")
    lr: float = _f(1e-5, "peak learning rate (paper: 1e-5; 3e-6 for the real-user run)")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                       "polynomial"] = _f(
        "constant_with_warmup", "learning-rate schedule over the optimizer updates (diffusers.optimization."
        "get_scheduler's): constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial; "
        "the decaying ones reach their end at the run's last step")
    warmup_steps: int = _f(0, "linear warmup length in optimizer updates (every schedule but constant)")
    num_cycles: int = _f(1, "cosine_with_restarts: number of hard restarts")
    power: float = _f(1.0, "polynomial: power of the decay (1 = linear); it decays to lr_end = 1e-7")
    weight_decay: float = _f(1e-2, "decoupled weight decay")
    betas: list[float] = _f([0.9, 0.999], "Adam betas (beta1, beta2)")
    eps: float = _f(1e-8, "Adam epsilon")
    min_8bit_size: int = _f(4096, "adamw8bit: tensors with fewer elements keep 32-bit state (bitsandbytes default)")


@dataclass
class DistConfig:
    """Multi-process training (torchrun)."""

    adapters: Literal["shard", "replicate"] = _f(
        "replicate", "trainable adapters: shard (FSDP2 fully_shard: params, grads and optimizer state "
        "sharded) | replicate (full copy per rank, gradients all-reduced); see docs/DISTRIBUTED.md")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "process-group backend; auto = nccl on GPU, gloo on CPU")
    timeout_s: int = _f(600, "collective timeout in seconds: the longest a rank waits inside one collective "
                             "(a step's all-reduce, rank 0's checkpoint write or sample grid)")
    heartbeat_s: float = _f(60.0, "a rank ends (exit 4, naming the peer) when a peer has sent no heartbeat for "
                                  "this long (stopped or hung); 0 = no watchdog")


@dataclass
class LogConfig:
    """Run folder, metrics, experiment trackers, sample grids."""

    run_dir: str = _f("", "run folder; empty = runs/<world>-<UTC time>[-N] (a new folder)")
    overwrite: bool = _f(False, "a fresh run into a folder that holds another run moves that run aside to "
                                "RUN.replaced-<UTC time> (never deleted); false = refuse")
    report_to: str = _f(
        "tensorboard", "experiment trackers: none | tensorboard (RUN/tb) | wandb | mlflow | "
        "all (every one installed), or a comma list such as tensorboard,wandb; the resolved config is logged as "
        "hyper-parameters and sample grids as images; a resumed run continues its wandb / MLflow runs "
        "(RUN/trackers.json); a requested tracker that is not installed is an error "
        "at start-up (replaces log.tensorboard, still read: true = tensorboard, false = none)")
    project: str = _f("ppd_engine", "wandb project / MLflow experiment the run is logged under")
    progress: bool = _f(True, "show the tqdm progress bar")
    eval_every: int = _f(0, "every this many steps (and at step 0), the loss, implicit accuracy and reward margin on "
                            "the world's fixed held-out pairs (seen users' and unseen users'), logged as "
                            "eval/<set>/<stat>; 0 = never (a world without held-out sets ignores it)")
    sample_every: int = _f(0, "write RUN/samples/step-N.png every this many steps; 0 = never")
    sample_prompts: list[str] = _f(["a photo of a cat", "a mountain lake at sunrise"],
                                   "prompts (grid columns) of the sample grid")
    sample_users: int = _f(3, "users (grid rows, first in sorted order) of the sample grid, plus a zero-embedding row")
    sample_steps: int = _f(20, "sampler steps of the sample grid")
    sample_guidance: float = _f(5.0, "text classifier-free guidance of the sample grid")
    sample_seed: int = _f(0, "seed of the sample grid (same noise every time)")


@dataclass
class CheckpointConfig:
    """RUN/checkpoints/step-N/ (adapters, optimizer, rng, data cursor, config)."""

    every: int = _f(500, "save every this many steps (and at the end); 0 = only at the end")
    keep_last: int = _f(3, "checkpoints kept; older ones are deleted")
    resume: str = _f("", "empty = fresh run; 'latest' = newest checkpoint of log.run_dir; "
                         "or a path to a run folder or a step-N checkpoint folder")


@dataclass
class Config:
    """Root of the run configuration."""

    world: str = _f("", "the application that builds model, data and embeddings and runs (ppd_engine.worlds: "
                        "toy | pickapic); empty = none (library use); the CLI defaults to toy")
    imports: list[str] = _f([], "Python modules imported before the config is validated (e.g. one that "
                                "registers a loss with @register_loss); the same as --import")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"help": "latent cache"})
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig, metadata={"help": "user adapters"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "loss"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "distributed"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "logging"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})




# ---------------------------------------------------------------------------------------------
# Sections added by worlds

SECTIONS: dict[str, type] = {}
_CLASSES: dict[tuple, type] = {}


def register_section(name: str, cls: type) -> None:
    """Add `cls` (a dataclass) as the root section `name` (e.g. the toy world's `toy:`)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r} must be a dataclass, got {cls!r}")
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section {name!r} would shadow a core key")
    SECTIONS[name] = cls


def config_class() -> type:
    """The root config class: `Config` plus every registered section (cached per registry state)."""
    key = tuple(sorted((n, id(c)) for n, c in SECTIONS.items()))
    if key not in _CLASSES:
        if not SECTIONS:
            _CLASSES[key] = Config
        else:
            extra = [(n, c, field(default_factory=c, metadata={"help": (c.__doc__ or n).strip().splitlines()[0]}))
                     for n, c in sorted(SECTIONS.items())]
            cls = dataclasses.make_dataclass("Config", extra, bases=(Config,))
            cls.__module__ = __name__
            cls.__doc__ = Config.__doc__
            _CLASSES[key] = cls
    return _CLASSES[key]
