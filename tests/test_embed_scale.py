"""Embedding at scale: torchrun ranks embed disjoint users into their own shards, and the union is
the store one process writes; generations that never reach the profile are retried, then failed."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from ppd_engine.embed.pipeline import WorkItem, embed_users
from ppd_engine.embed.prompt import ProfileTemplate
from ppd_engine.embed.store import EmbeddingStore
from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture
from ppd_engine.testing.tiny_vlm import make_tiny_llava


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    make_tiny_llava(str(root / "vlm"))
    write_pickapic_fixture(str(root / "data"), extra_users=2, pairs_per_extra_user=8)
    return str(root / "vlm"), str(root / "data")


def _args(model, data, out):
    # One prompt per batch: the sampling seed of a batch is its first row's, so batches of one
    # make every chunk's draw independent of how users are split between ranks.
    return ["--data", data, "--model", model, "--out", out, "--max-new-tokens", "3", "--chunks", "2",
            "--batch-users", "1", "--device", "cpu", "--no-progress", "--keep-without-profile"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, args):
    from ppd_engine.embed.__main__ import main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert isinstance(main(args), dict)


@pytest.mark.slow  # ~30 s: two spawned processes import torch + transformers
def test_two_ranks_write_two_shards_that_merge_into_the_one_rank_store(setup, tmp_path):
    from ppd_engine.embed.__main__ import main

    model, data = setup
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    main(_args(model, data, one))
    mp.spawn(_worker, args=(2, _free_port(), _args(model, data, two)), nprocs=2, join=True)
    assert {f.split("-")[0] for f in os.listdir(two) if f.endswith(".safetensors")} == {"r0", "r1"}
    a, b = EmbeddingStore(one), EmbeddingStore(two)
    assert a.users() == b.users() and len(a) >= 4
    for u in a.users():
        assert torch.equal(a.get(u), b.get(u)), u
        assert a.meta(u) == b.meta(u)
    # A rerun of either has nothing left to do.
    assert main(_args(model, data, two))["users_already_done"] == len(b)


class _Scripted:
    """A generator whose texts follow a script (the marker check is about the text, not the model)."""

    def __init__(self, texts):
        self.texts, self.calls = list(texts), []
        self.settings = SimpleNamespace(compile=False, greedy=False, max_new_tokens=64, as_meta=lambda: {})

    def generate(self, prompts, seed=None, pad_batch_to=None):
        self.calls.append((len(prompts), seed))
        texts = [self.texts.pop(0) for _ in prompts]
        return SimpleNamespace(texts=texts, tokens=[torch.ones(2, dtype=torch.long)] * len(prompts),
                               states=torch.randn(len(prompts), 1, 4), prompt_lengths=[5] * len(prompts))


class _Template:
    sha256, path = "0" * 64, "t"

    def render(self, shots):
        return "prompt"


def test_generations_without_a_profile_are_retried_then_failed(tmp_path):
    items = [WorkItem("a", 0, []), WorkItem("b", 0, []), WorkItem("c", 0, [])]
    gen = _Scripted(["Pair 1: ...\nUser Profile: likes red", "cut off mid-thought", "**User Profile:** blue",
                     "still nothing",              # b, retry 1
                     "again nothing"])             # b, retry 2 -> failed
    store = EmbeddingStore(str(tmp_path / "s"))
    stats = embed_users(items, gen, _Template(), store, batch_users=3, seed=0, model_id="m", progress=False,
                        retries=2, require_profile=True)
    assert stats["chunks_no_profile"] == 1 and stats["chunks_retried"] == 2 and stats["chunks_embedded"] == 2
    assert [n for n, _ in gen.calls] == [3, 1, 1] and len({s for _, s in gen.calls}) == 3
    assert EmbeddingStore(store.path).users() == ["a", "c"]
    assert store.profile("c") == "**User Profile:** blue" and store.meta("c")[0]["user_profile"] == "blue"


def test_multi_image_prompts_are_padded_not_tiled(setup):
    """The authors ran LLaVA-OneVision with image_aspect_ratio="pad" (~729 tokens per 384 px image);
    transformers tiles "anyres" (~3.7k tokens) only prompts with ONE image. A profile prompt holds
    2 x shots images, so each image must cost exactly num_image_tokens + 1 (its newline) tokens,
    whatever its size and aspect: this pins that a transformers upgrade did not start tiling them."""
    import numpy as np
    from PIL import Image

    from ppd_engine.embed.generate import GenerationSettings, VLMGenerator
    from ppd_engine.embed.vlm import load_vlm

    model, processor = load_vlm(setup[0])
    gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=1))
    rng = np.random.default_rng(0)

    def shots(sizes):
        return [SimpleNamespace(caption=f"c{i}", uid_w=f"w{i}", uid_l=f"l{i}",
                                image_w=Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                                image_l=Image.fromarray(rng.integers(0, 255, (w, h, 3), dtype=np.uint8)))
                for i, (w, h) in enumerate(sizes)]

    per_image = processor.num_image_tokens + 1
    for sizes in ([(40, 30), (64, 20)], [(300, 900)] * 2):
        batch = gen.encode([ProfileTemplate().render(shots(sizes))])
        n_image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
        assert n_image_tokens == 2 * len(sizes) * per_image, (sizes, n_image_tokens)
        assert batch["batch_num_images"].tolist() == [2 * len(sizes)]
