"""Batched profile generation with a VLM and the hidden state(s) of the final generated token.

Two decode paths share everything but the cache and the compiler:
  eager     dynamic KV cache, plain PyTorch (the reference and the fallback)
  compiled  transformers' static KV cache + `torch.compile` of the one-token decode step
            (`cache_implementation="static"` with a `CompileConfig`); the prefill stays eager.
Prompts of a batch are left-padded, so every row's next token is in the last column.

Which token's state is "the final generated token's": `generate` runs the model on the prompt and
then on each sampled token except the last one (sampling it ends the loop), so the hidden states it
returns for its last step belong to the token BEFORE the final one. We therefore run one more
forward over prompt + generated tokens and read the states at the final generated token's position
(for a row that stopped early that is its EOS token; the pads after it are masked out and, the
attention being causal, cannot change it anyway).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .prompt import Prompt, to_chatml, to_hf_conversation

LAYER_CHOICES = ("last", "all")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    greedy: bool = False
    temperature: float = 0.7   # paper: 0.7 for profiles (the judge uses 1.0)
    top_p: float = 1.0         # no nucleus truncation
    compile: bool = False
    min_new_tokens: int = 0    # > 0 suppresses EOS until then (benchmarks fix the decode length)
    layers: str = "last"       # "last": (1, D); "all": (num_layers + 1, D), embeddings output first
    # Rows per extra forward that reads the final token's states; bounds the memory of
    # output_hidden_states (layers x rows x sequence x width) on long multi-image prompts.
    state_batch: int = 4

    def __post_init__(self):
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {self.layers!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")

    def as_meta(self) -> dict:
        d = asdict(self)
        d.pop("state_batch")
        return d


@dataclass
class GenerationOutput:
    texts: list[str]                 # decoded generated text per prompt (special tokens removed)
    tokens: list[torch.Tensor]       # (n_i,) generated ids per prompt, EOS included when produced
    states: torch.Tensor | None      # (B, L, D) float32 on CPU; L = 1 (last) or num_layers + 1 (all)
    prompt_lengths: list[int]        # unpadded prompt length in tokens per prompt


class VLMGenerator:
    """Runs a loaded VLM + processor over rendered `Prompt`s in batches."""

    def __init__(self, model, processor, settings: GenerationSettings):
        self.model = model
        self.processor = processor
        self.settings = settings
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.is_llava_ov = getattr(model.config, "model_type", "") == "llava_onevision"
        tok = processor.tokenizer
        gen_cfg = model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids))

    # -- inputs -------------------------------------------------------------------------------
    def prompt_text(self, prompt: Prompt) -> str:
        if self.is_llava_ov:
            return to_chatml(prompt, self.processor.image_token)
        return self.processor.apply_chat_template(to_hf_conversation(prompt), add_generation_prompt=True,
                                                  tokenize=False)

    def encode(self, prompts: list[Prompt]):
        """Left-padded model inputs (input_ids, attention_mask, pixel_values, ...) on the device."""
        texts = [self.prompt_text(p) for p in prompts]
        images = [p.images for p in prompts]
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    # -- generation ---------------------------------------------------------------------------
    def _generate_kwargs(self, prompt_len: int) -> dict:
        s = self.settings
        kw = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens or None,
                  pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), return_dict_in_generate=True)
        if s.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=None)
        if s.compile:
            from transformers import CompileConfig

            cuda = self.device.type == "cuda"
            # CUDA graphs ("reduce-overhead") only exist on GPUs; inductor's default mode elsewhere.
            cc = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if cuda else "default")
            cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
            # The decode graph's shapes are (batch, cache length). Rounding the length up to 256, and
            # transformers keeping the largest length seen, lets prompts of varying length share one
            # compiled graph; only a prompt crossing into a new multiple of 256 recompiles, once.
            max_cache = -(-(prompt_len + s.max_new_tokens) // 256) * 256
            kw.update(cache_implementation="static", compile_config=cc, max_cache_len=max_cache)
        else:
            kw.update(disable_compile=True)
        return kw

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], seed: int | None = None, pad_batch_to: int | None = None,
                 want_states: bool = True) -> GenerationOutput:
        """Generate for a batch of prompts; `pad_batch_to` repeats the last prompt up to that many rows
        (results dropped) so that a compiled decode sees one batch size throughout a run."""
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        n_real = len(prompts)
        if pad_batch_to is not None and pad_batch_to > n_real:
            prompts = list(prompts) + [prompts[-1]] * (pad_batch_to - n_real)
        batch = self.encode(prompts)
        prompt_len = batch["input_ids"].shape[1]
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(**batch, **self._generate_kwargs(prompt_len))
        gen = out.sequences[:, prompt_len:]
        lengths = self._generated_lengths(gen)
        states = self.final_token_states(batch, gen, lengths)[:n_real] if want_states else None
        tokens = [gen[i, : lengths[i]].cpu() for i in range(n_real)]
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        prompt_lengths = batch["attention_mask"].sum(1).tolist()[:n_real]
        return GenerationOutput(texts, tokens, states, prompt_lengths)

    def _generated_lengths(self, gen: torch.Tensor) -> list[int]:
        """Tokens each row really generated: up to and including its first EOS, else all of them
        (after EOS `generate` fills a finished row with pad tokens)."""
        is_eos = torch.zeros_like(gen, dtype=torch.bool)
        for e in self.eos_ids:
            is_eos |= gen == e
        any_eos = is_eos.any(1)
        first = is_eos.int().argmax(1)
        full = torch.full_like(first, gen.shape[1])
        return torch.where(any_eos, first + 1, full).tolist()

    @torch.inference_mode()
    def final_token_states(self, batch: dict, gen: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """(B, L, D) float32 states of each row's final generated token from one forward over
        prompt + generated tokens, with the same left-padding positions `generate` used."""
        B, P = batch["input_ids"].shape
        G = gen.shape[1]
        ids = torch.cat([batch["input_ids"], gen], dim=1)
        lengths_t = torch.tensor(lengths, device=ids.device)
        gen_mask = (torch.arange(G, device=ids.device)[None, :] < lengths_t[:, None]).to(batch["attention_mask"].dtype)
        mask = torch.cat([batch["attention_mask"], gen_mask], dim=1)
        # generate() numbers positions from the first real token (pads get 0); match it exactly.
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        target = P + lengths_t - 1
        # LLaVA-OneVision's pixel_values hold whole images (batch_num_images per row), so rows can be
        # split; other processors flatten patches across the batch, so they run in one piece.
        step = max(1, self.settings.state_batch) if "batch_num_images" in batch else B
        starts = [0] + torch.tensor(batch["batch_num_images"].tolist()).cumsum(0).tolist() if step < B else None
        rows = []
        for a in range(0, B, step):
            b = min(B, a + step)
            kw = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            if step < B:
                ia, ib = starts[a], starts[b]
                for k in ("pixel_values", "image_sizes"):
                    if k in kw:
                        kw[k] = kw[k][ia:ib]
                kw["batch_num_images"] = kw["batch_num_images"][a:b]
            kw.update(input_ids=ids[a:b], attention_mask=mask[a:b], use_cache=False)
            if self.is_llava_ov:  # multimodal-rope models (Qwen2-VL) derive positions from the mask
                kw["position_ids"] = pos[a:b]
            want_all = self.settings.layers == "all"
            # The base model (no LM head) avoids materialising vocabulary-sized logits.
            out = self.model.model(**kw, output_hidden_states=want_all)
            idx = target[a:b]
            sel = torch.arange(b - a, device=ids.device)
            if want_all:
                hs = torch.stack([h[sel, idx] for h in out.hidden_states], dim=1)   # (b-a, L+1, D)
            else:
                hs = out.last_hidden_state[sel, idx][:, None]                       # (b-a, 1, D)
            rows.append(hs.float().cpu())
        return torch.cat(rows, dim=0)

