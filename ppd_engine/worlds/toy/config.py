"""The `toy` section of the root config: everything the embedded toy world needs.

Other sections of the root `Config` (train, optim, loss, adapters, log, ...) apply to the toy run
too: PPD and its non-personalized DPO baseline both train with them, so both get the same budget
(train.max_steps x train.pairs_per_step). This section describes the world (images, users,
few-shot data) and the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_seen() -> list[str]:
    return ["warm_bright", "cool_dark", "warm_dark", "cool_bright",
            "vivid", "muted", "high_contrast", "flat", "bright_vivid", "dark_muted"]


def _default_unseen() -> list[str]:
    return ["sunset", "night", "pastel", "cool_vivid"]


def _default_interp() -> list[str]:
    return ["warm_bright:cool_dark", "vivid:muted"]


def _default_lambdas() -> list[float]:
    return [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass
class ToyConfig:
    """Toy world: procedural scenes, users as weights over REWARDS, few-shot embeddings, eval."""

    image_size: int = field(default=16, metadata={
        "help": "side of the square RGB scenes in pixels; the pretrained asset fixes it (16)"})
    pretrained: str = field(default="", metadata={
        "help": "base model safetensors; empty = the shipped asset ppd_engine/worlds/toy/assets/toy_base.safetensors"})
    seed: int = field(default=0, metadata={
        "help": "seed of the world: scenes, labels, few-shot subsets, eval seeds"})
    seen_users: list[str] = field(default_factory=_default_seen, metadata={
        "help": "users whose preference pairs train PPD (names from ppd_engine.worlds.toy.users.USERS)"})
    unseen_users: list[str] = field(default_factory=_default_unseen, metadata={
        "help": "users never trained on; only their 4 few-shot pairs are read, at evaluation"})
    pairs_per_user: int = field(default=512, metadata={
        "help": "labelled preference pairs generated per seen user (training data)"})
    heldout_pairs: int = field(default=12, metadata={
        "help": "labelled pairs per user (seen and unseen), drawn apart from the training pairs and shots: the "
                "held-out sets of log.eval_every (eval/seen/*, eval/unseen/*); 0 = none"})
    label_scale: float = field(default=20.0, metadata={
        "help": "Bradley-Terry sharpness: P(a preferred) = sigmoid(label_scale * (r_a - r_b)); "
                "lower = noisier labels"})
    encoder: str = field(default="generic", metadata={
        "help": "few-shot encoder of the headline PPD: 'generic' (a scene autoencoder's features, trained "
                "without rewards or users) or 'oracle' (the very statistics the rewards are defined on)"})
    features: str = field(default="", metadata={
        "help": "generic encoder's feature extractor safetensors; empty = the shipped asset "
                "ppd_engine/worlds/toy/assets/toy_features.safetensors"})
    encoder_components: int = field(default=8, metadata={
        "help": "principal axes of the generic features' pair differences the encoder keeps"})
    oracle_column: bool = field(default=True, metadata={
        "help": "also train and evaluate PPD with the oracle encoder (column ppd_oracle, an upper bound)"})
    guided_column: float = field(default=1.0, metadata={
        "help": "also sample the headline PPD with this user guidance (column ppd_guided); 0 = no column"})
    n_shots: int = field(default=4, metadata={
        "help": "labelled pairs per few-shot user embedding (the paper's N = 4)"})
    embeddings_per_user: int = field(default=16, metadata={
        "help": "K: few-shot embeddings per user, each from a different n_shots subset of its pairs"})
    eval_samples_per_user: int = field(default=96, metadata={
        "help": "samples per user per model (base, dpo, ppd, ...) for win rates; same prompts and seeds across "
                "models and users"})
    bootstrap: int = field(default=2000, metadata={
        "help": "bootstrap resamples of the sample indices behind every 95% interval of the report"})
    identify_draws: int = field(default=32, metadata={
        "help": "fresh n_shots draws per user for the report's top-1 user retrieval"})
    sample_steps: int = field(default=12, metadata={
        "help": "DDIM steps when sampling for evaluation"})
    guidance: float = field(default=2.0, metadata={
        "help": "classifier-free guidance scale over the caption during evaluation"})
    user_guidance: float = field(default=0.0, metadata={
        "help": "extra classifier-free guidance over the user embedding for the headline PPD (0 = off; "
                "toy.guided_column reports the guided model beside it)"})
    eval_batch: int = field(default=256, metadata={
        "help": "images sampled per batched call during evaluation"})
    interpolation_pairs: list[str] = field(default_factory=_default_interp, metadata={
        "help": "user pairs 'A:B' whose embeddings are mixed lambda*A + (1-lambda)*B at inference"})
    interpolation_lambdas: list[float] = field(default_factory=_default_lambdas, metadata={
        "help": "mixing weights of the first user along the interpolation"})
    interpolation_samples: int = field(default=32, metadata={
        "help": "samples per lambda of each interpolation"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads for the toy run; 0 = torch's default. 1 is often as fast for 16x16 "
                "images and far more robust on a busy machine"})
    report_samples: int = field(default=4, metadata={
        "help": "samples per (user, model) cell shown in report.png"})

    def validate(self) -> None:
        """Checks of the toy section (ConfigError naming the key); floats are finite already."""
        from ppd_engine.config.schema import ConfigError
        from ppd_engine.worlds.toy.users import USERS

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"toy.{key}: {msg}")

        for key in ("image_size", "pairs_per_user", "n_shots", "embeddings_per_user", "eval_samples_per_user",
                    "sample_steps", "eval_batch", "interpolation_samples", "report_samples", "bootstrap",
                    "identify_draws", "encoder_components"):
            need(getattr(self, key) >= 1, key, f"{getattr(self, key)} must be >= 1")
        need(self.heldout_pairs >= 0, "heldout_pairs", f"{self.heldout_pairs} must be >= 0 (0 = none)")
        need(self.threads >= 0, "threads", f"{self.threads} must be >= 0 (0 = torch's default)")
        need(self.n_shots < self.pairs_per_user, "n_shots",
             f"{self.n_shots} shots need more than toy.pairs_per_user={self.pairs_per_user} pairs")
        need(self.encoder in ("generic", "oracle"), "encoder", f"{self.encoder!r} must be 'generic' or 'oracle'")
        need(self.guided_column >= 0, "guided_column", f"{self.guided_column} must be >= 0 (0 = no column)")
        need(self.label_scale > 0, "label_scale", f"{self.label_scale} must be > 0")
        need(self.guidance >= 0 and self.user_guidance >= 0, "guidance",
             f"guidance {self.guidance} and user_guidance {self.user_guidance} must be >= 0")
        for key in ("seen_users", "unseen_users"):
            for u in getattr(self, key):
                need(u in USERS, key, f"{u!r} is not a toy user; known: {', '.join(sorted(USERS))}")
        need(bool(self.seen_users), "seen_users", "at least one seen user is needed to train")
        overlap = sorted(set(self.seen_users) & set(self.unseen_users))
        need(not overlap, "unseen_users", f"{overlap} are also seen users")
        need(all(0.0 <= lam <= 1.0 for lam in self.interpolation_lambdas), "interpolation_lambdas",
             f"{self.interpolation_lambdas} must lie in [0, 1]")
