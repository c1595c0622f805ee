"""User embeddings on a tiny random LLaVA-OneVision saved to and loaded from a temp folder."""
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ppd_engine.embed.generate import GenerationSettings, VLMGenerator
from ppd_engine.embed.prompt import IMAGE, ProfileTemplate, as_pil, to_chatml
from ppd_engine.embed.vlm import load_vlm
from ppd_engine.testing.tiny_vlm import NUM_LAYERS, TEXT_WIDTH, make_tiny_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))
    model, processor = load_vlm(folder)
    return folder, model, processor


def _img(rng, w=None, h=None):
    from PIL import Image

    w = w or int(rng.integers(20, 60))
    h = h or int(rng.integers(20, 60))
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _shots(rng, n=4, tag="u"):
    return [SimpleNamespace(caption=f"a photo of {tag} {i}", image_w=_img(rng), image_l=_img(rng),
                            uid_w=f"{tag}w{i}", uid_l=f"{tag}l{i}", ranking_id=f"{tag}r{i}") for i in range(n)]


def test_template_structure_and_hash(tmp_path):
    rng = np.random.default_rng(1)
    t = ProfileTemplate()
    shots = _shots(rng, 4)
    p = t.render(shots)
    assert [m.role for m in p.messages] == ["system", "user"]
    assert sum(x is IMAGE for x in p.messages[1].parts) == 8 == len(p.images)
    text = to_chatml(p, "<image>")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.rstrip().count("<image>") == 8
    # each pair: caption, then its preferred and dispreferred image, in order
    body = p.text_only()
    for i, s in enumerate(shots):
        at = body.index(f'Pair {i + 1}. Caption: "{s.caption}"')
        assert body.index("Preferred image: <image>", at) < body.index("Dispreferred image: <image>", at)
    assert body.rstrip().endswith("User Profile: [description]")
    q = t.render(shots[:2], ("a query", _img(rng), _img(rng)))
    assert len(q.images) == 6 and "Prediction of user preference: [1 or 2]" in q.text_only()
    # another template file gets another hash; a wrong slot count is a clear error
    other = tmp_path / "t.txt"
    other.write_text("[[system]]\nexpert\n[[user]]\n{% for p in pairs %}{{ p.caption }} [[image]]\n{% endfor %}")
    t2 = ProfileTemplate(str(other))
    assert t2.sha256 != t.sha256
    with pytest.raises(ValueError, match="4 \\[\\[image\\]\\] slots for 8 images"):
        t2.render(shots)


def test_images_from_bytes_and_corrupt_bytes():
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    _img(rng, 33, 21).save(buf, format="JPEG")
    assert as_pil(buf.getvalue()).size == (33, 21)
    with pytest.raises(ValueError, match="uid-7"):
        as_pil(b"\xff\xd8 not a jpeg", "image uid-7")


def _manual_state(model, processor, gen, prompt, tokens, layers):
    """Reference: one unpadded forward over a single row's prompt + generated tokens."""
    batch = gen.encode([prompt])
    ids = torch.cat([batch["input_ids"][0], tokens])[None]
    out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                      image_sizes=batch["image_sizes"], batch_num_images=batch["batch_num_images"],
                      output_hidden_states=True)
    hs = torch.stack([h[0] for h in out.hidden_states], dim=1)  # (T, L + 1, D)
    return hs if layers == "all" else hs[:, -1:], out


@torch.inference_mode()
def test_final_token_state_is_the_final_generated_token(tiny):
    folder, model, processor = tiny
    rng = np.random.default_rng(3)
    t = ProfileTemplate()
    # captions of different lengths -> different prompt lengths -> real left padding in the batch
    prompts = [t.render(_shots(rng, 4, tag="x" * (1 + 5 * i))) for i in range(3)]
    gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=7, greedy=True, layers="all",
                                                            state_batch=2))
    out = gen.generate(prompts)
    assert out.states.shape == (3, NUM_LAYERS + 1, TEXT_WIDTH)
    assert len(set(out.prompt_lengths)) == 3
    for i, p in enumerate(prompts):
        ref, full = _manual_state(model, processor, gen, p, out.tokens[i], "all")
        n = len(out.tokens[i])
        assert n >= 2
        torch.testing.assert_close(out.states[i], ref[-1], atol=2e-4, rtol=2e-4)
        # not the state of the token before (what generate's last step returns)
        assert (out.states[i, -1] - ref[-2, -1]).abs().max() > 1e-2
        # off-by-one check from the other side: the previous position's logits chose the final token
        logits = model.lm_head(full.last_hidden_state[0, -2])
        assert int(logits.argmax()) == int(out.tokens[i][-1])
        # the same row decoded alone: same tokens, same state (left padding changes nothing)
        alone = gen.generate([p])
        assert torch.equal(alone.tokens[0], out.tokens[i])
        torch.testing.assert_close(alone.states[0], out.states[i], atol=2e-4, rtol=2e-4)
    # layers=last is the last entry of layers=all
    gen.settings.layers = "last"
    last = gen.generate(prompts)
    assert last.states.shape == (3, 1, TEXT_WIDTH)
    torch.testing.assert_close(last.states[:, 0], out.states[:, -1], atol=2e-4, rtol=2e-4)


def test_generated_lengths_stop_at_first_eos(tiny):
    _, model, processor = tiny
    gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=5, greedy=True))
    eos, pad = next(iter(gen.eos_ids)), gen.pad_id
    g = torch.tensor([[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    assert gen._generated_lengths(g) == [3, 5, 1]


@torch.inference_mode()
def test_sampling_is_seedable(tiny):
    _, model, processor = tiny
    rng = np.random.default_rng(4)
    prompts = [ProfileTemplate().render(_shots(rng, 2))]
    gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=12, temperature=0.7))
    a = gen.generate(prompts, seed=11, want_states=False).tokens[0]
    b = gen.generate(prompts, seed=11, want_states=False).tokens[0]
    c = [gen.generate(prompts, seed=s, want_states=False).tokens[0] for s in (12, 13, 14)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, x) for x in c)
    with pytest.raises(ValueError, match="layers"):
        GenerationSettings(layers="middle")


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_matches_eager(tiny):
    """Static cache + torch.compile'd decode gives the eager path's greedy tokens and states."""
    _, model, processor = tiny
    rng = np.random.default_rng(5)
    t = ProfileTemplate()
    prompts = [t.render(_shots(rng, 2, tag="y" * (1 + 4 * i))) for i in range(2)]
    eager = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=6, greedy=True, layers="all"))
    comp = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=6, greedy=True, layers="all",
                                                             compile=True))
    e = eager.generate(prompts)
    c = comp.generate(prompts, pad_batch_to=3)  # padded rows are dropped from the results
    assert c.states.shape == e.states.shape == (2, NUM_LAYERS + 1, TEXT_WIDTH)
    for i in range(2):
        assert torch.equal(c.tokens[i], e.tokens[i])
    torch.testing.assert_close(c.states, e.states, atol=2e-4, rtol=2e-4)
    assert hasattr(model, "_compiled_call")  # the decode really went through torch.compile
    # a later batch with other prompt lengths reuses the compiled decode (fixed batch and cache size)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    more = [t.render(_shots(rng, 2, tag="z" * (2 + 7 * i))) for i in range(3)]
    c2 = comp.generate(more, pad_batch_to=3)
    e2 = eager.generate(more)
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.equal(a, b) for a, b in zip(c2.tokens, e2.tokens))


def test_cli_end_to_end_and_resume(tiny, tmp_path):
    from ppd_engine.embed.__main__ import main
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    folder, _, _ = tiny
    data = tmp_path / "pickapic"
    write_pickapic_fixture(str(data), extra_users=1, pairs_per_extra_user=8)
    out = str(tmp_path / "users.safetensors")
    args = ["--data", str(data), "--model", folder, "--out", out, "--max-new-tokens", "3", "--greedy",
            "--layers", "all", "--chunks", "2", "--batch-users", "3", "--save-every", "1", "--device", "cpu", "--no-progress",
            "--keep-without-profile"]   # 3 tokens of a random model never reach "User Profile:"
    stats = main(args)
    store = EmbeddingStore(out)
    users = store.users()
    # The index is read without decoding: users whose few-shot JPEGs are corrupt (102, 105 in the
    # fixture) are found, skipped and counted while embedding.
    assert stats["chunks_bad_images"] >= 1 and len(users) >= 3
    assert len(users) + stats["chunks_bad_images"] >= stats["users_with_shots"]
    assert store.shape == (NUM_LAYERS + 1, TEXT_WIDTH)
    # the 8-pair user gets 2 disjoint chunks; everyone else 1 (no second group of 4)
    ks = {u: store.get(u).shape[0] for u in users}
    assert sorted(ks.values())[-1] == 2 and sum(ks.values()) == stats["chunks_embedded"]
    u2 = next(u for u, k in ks.items() if k == 2)
    m = store.meta(u2)
    uids = [s["uid_w"] for c in m for s in c["shots"]]
    assert len(uids) == 8 == len(set(uids))
    assert m[0]["prompt_sha256"] == ProfileTemplate().sha256 and m[0]["model"] == folder
    assert m[0]["generation"]["greedy"] is True and m[0]["generation"]["layers"] == "all"
    assert isinstance(store.profile(u2, 1), str)
    assert all(len(c["shots"]) == 4 and c["shots"][0]["caption"] for c in m)
    # rerun: nothing left to do but the chunks with corrupt images, nothing lost
    again = main(args)
    assert again["users_already_done"] == len(users) and again.get("chunks_embedded", 0) == 0
    assert EmbeddingStore(out).users() == users


def test_pipeline_skips_items_with_undecodable_images(tiny, tmp_path):
    from ppd_engine.embed.pipeline import WorkItem, embed_users
    from ppd_engine.embed.store import EmbeddingStore

    _, model, processor = tiny
    rng = np.random.default_rng(6)
    good = [WorkItem("a", 0, _shots(rng, 2, "a")), WorkItem("c", 0, _shots(rng, 2, "c"))]
    bad_shots = _shots(rng, 2, "b")
    bad_shots[1].image_l = b"\x89PNG broken"
    items = [good[0], WorkItem("b", 0, bad_shots), good[1]]
    store = EmbeddingStore(str(tmp_path / "s.safetensors"))
    gen = VLMGenerator(model, processor, GenerationSettings(max_new_tokens=2, temperature=0.7))
    stats = embed_users(items, gen, ProfileTemplate(), store, batch_users=2, seed=3, model_id="tiny",
                        save_every=1, progress=False)
    assert stats["chunks_bad_images"] == 1 and stats["chunks_embedded"] == 2
    assert EmbeddingStore(store.path).users() == ["a", "c"]
    assert store.meta("a")[0]["sample_seed"] is not None and store.meta("a")[0]["generation"]["temperature"] == 0.7


def test_resume_plans_the_chunks_the_store_lacks_by_number(tmp_path):
    """A user whose chunk 1 failed (not stored) while chunk 2 was: a rerun embeds chunks 1 and 3. It
    used to count embeddings (2) and redo chunks 2 and 3: chunk 2 twice, chunk 1 never."""
    from ppd_engine.embed.pipeline import plan
    from ppd_engine.embed.store import EmbeddingStore

    recs = [SimpleNamespace(uid_w=f"w{i}", uid_l=f"l{i}", caption=f"c{i}") for i in range(16)]
    store = EmbeddingStore(str(tmp_path / "users"))
    store.append_many([("u", torch.zeros(2, 1, 3), {"chunks": [{"chunk": 0}, {"chunk": 2}]}),
                       ("v", torch.zeros(1, 1, 3), None)])             # no chunk numbers: its first one
    items, stats = plan({"u": recs, "v": recs}, {"u": recs[:4], "v": recs[:4]}, 4, 4, 0, store)
    assert [(it.user_id, it.chunk) for it in items] == [("u", 1), ("u", 3), ("v", 1), ("v", 2), ("v", 3)]
    assert stats == {"users_already_done": 0, "users_resumed": 2}


def test_embed_reads_a_users_own_columns(tiny, tmp_path):
    """--columns (every --data command's): a user's own dataset with user ids embeds the same users
    with the same number of chunks as the Pick-a-Pic data it was written from (it could read only
    Pick-a-Pic's schema, so a personalized run on one's own data had no way to get embeddings)."""
    from ppd_engine.embed.__main__ import main
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.testing.pickapic_fixture import write_columns_twin, write_pickapic_fixture

    folder, _, _ = tiny
    write_pickapic_fixture(str(tmp_path / "pic"), extra_users=1, pairs_per_extra_user=8)
    mapping = write_columns_twin(str(tmp_path / "pic"), str(tmp_path / "own"))
    common = ["--model", folder, "--max-new-tokens", "2", "--greedy", "--chunks", "2", "--batch-users", "4",
              "--device", "cpu", "--no-progress", "--keep-without-profile"]
    main(["--data", str(tmp_path / "pic"), "--out", str(tmp_path / "a"), *common])
    main(["--data", str(tmp_path / "own"), "--columns", ",".join(f"{k}={v}" for k, v in mapping.items()),
          "--out", str(tmp_path / "b"), *common])
    a, b = EmbeddingStore(str(tmp_path / "a")), EmbeddingStore(str(tmp_path / "b"))
    assert b.users() == a.users() and len(a.users()) >= 3
    assert {u: b.count(u) for u in b.users()} == {u: a.count(u) for u in a.users()}
    assert all(s["uid_w"].endswith(".jpg") for u in b.users() for c in b.meta(u) for s in c["shots"])
    assert main(["--data", str(tmp_path / "own"), "--columns", "prompt=text,image_0", "--out", str(tmp_path / "c"),
                 *common]) == 2
