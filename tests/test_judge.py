"""VLM judge: answer parsing, order consistency, the HTTP backend against a local server, the local VLM."""
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ppd_engine.judge import Judge, LocalVLMBackend, OpenAIBackend, parse_choice


def _img(rng):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (int(rng.integers(20, 50)), int(rng.integers(20, 50)), 3),
                                        dtype=np.uint8))


def _shots(rng, n=2):
    return [SimpleNamespace(caption=f"cap {i}", image_w=_img(rng), image_l=_img(rng), uid_w=f"w{i}",
                            uid_l=f"l{i}") for i in range(n)]


@pytest.mark.parametrize("text,want", [
    ("Pair 1: ...\nUser Profile: likes red\nPrediction of user preference: 2", 2),
    ("prediction of user preference: Image 1.", 1),
    ("**Prediction of User Preference:** [2]", 2),
    ("Prediction of user preference:\n\n1\n", 1),
    ("Prediction of user preference: 1\n...on reflection...\nPrediction of user preference: 2", 2),
    ("Prediction of user preference: [1 or 2]", None),   # echoed format
    ("Prediction of user preference: 3", None),
    ("I prefer image 1", None),                           # no prediction line
    ("", None),
    (None, None),
])
def test_parse_choice(text, want):
    assert parse_choice(text) == want


class ScriptedBackend:
    """Answers from a list, in call order; records the prompts it saw."""

    name = "scripted"

    def __init__(self, answers):
        self.answers = list(answers)
        self.prompts = []

    def answer(self, prompts, seed):
        self.prompts += prompts
        return [self.answers.pop(0) for _ in prompts]


def test_order_consistency_keeps_only_agreeing_pairs():
    rng = np.random.default_rng(0)
    shots, a, b = _shots(rng), _img(rng), _img(rng)
    P = "Prediction of user preference: {}"
    backend = ScriptedBackend([
        P.format(1), P.format(2),        # A first, then A (now in slot 2): consistent -> A
        P.format(2), P.format(1),        # B, B: consistent -> B
        P.format(1), P.format(1),        # always slot 1 (position bias): inconsistent -> dropped
        P.format(2), "garbage",          # malformed second answer -> dropped
        None, P.format(2),               # failed request -> dropped
    ])
    judge = Judge(backend)
    results = [judge.compare(shots, a, b, "a query") for _ in range(5)]
    assert [r.choice for r in results] == [0, 1, None, None, None]
    assert [r.consistent for r in results] == [True, True, False, False, False]
    assert results[3].answers == (P.format(2), "garbage")
    # the second prompt of each comparison shows the images swapped
    p_ab, p_ba = backend.prompts[0], backend.prompts[1]
    assert p_ab.images[-2] is p_ba.images[-1] or p_ab.images[-2].tobytes() == p_ba.images[-1].tobytes()
    assert "Prediction of user preference" in p_ab.text_only()
    wr = Judge(ScriptedBackend([P.format(1), P.format(2)] * 2 + [P.format(2), P.format(1)] + ["x", "y"])).winrate(
        shots, [a] * 4, [b] * 4, ["c"] * 4, batch=3)
    assert (wr.wins_a, wr.wins_b, wr.dropped, wr.win_rate_a) == (2, 1, 1, 2 / 3)


class _Server:
    """A chat-completions endpoint on 127.0.0.1 playing a scripted list of (status, body) replies."""

    def __init__(self, replies):
        self.replies = list(replies) if not callable(replies) else replies
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if callable(outer.replies):
                    status, payload = outer.replies(body)
                else:
                    status, payload = outer.replies.pop(0) if outer.replies else (200, _chat("no script left"))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _chat(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_http_backend_retries_and_garbage(monkeypatch, caplog):
    rng = np.random.default_rng(1)
    shots, a, b = _shots(rng), _img(rng), _img(rng)
    P = "User Profile: bold colours\nPrediction of user preference: {}"
    replies = [
        (429, {"error": "slow down"}), (503, {"error": "busy"}), (200, _chat(P.format(2))),   # retried twice
        (200, _chat(P.format(1))),                                                            # -> consistent B
        (200, b"<html>not json</html>"), (200, {"choices": []}),                              # garbage -> dropped
        (200, _chat("I cannot decide")), (200, _chat(P.format(1))),                           # malformed -> dropped
        (500, {}), (500, {}), (500, {}),                                                      # retries exhausted
        (200, _chat(P.format(2))),
    ]
    secret = "sk-test-SECRET-never-log"
    monkeypatch.setenv("PPD_JUDGE_API_KEY", secret)
    with _Server(replies) as srv, caplog.at_level(logging.DEBUG):
        monkeypatch.setenv("PPD_JUDGE_BASE_URL", srv.url)
        backend = OpenAIBackend("judge-model", max_retries=2, backoff=0.01, timeout=5, workers=1)
        judge = Judge(backend, seed=3)
        r1 = judge.compare(shots, a, b, "q")
        r2 = judge.compare(shots, a, b, "q")
        r3 = judge.compare(shots, a, b, "q")
        r4 = judge.compare(shots, a, b, "q")
    assert (r1.choice, r1.consistent) == (1, True)
    assert r2.choice is None and r2.answers == (None, None)
    assert r3.choice is None and not r3.consistent
    assert r4.choice is None and r4.answers[0] is None
    assert backend.stats["retries"] == 4 and backend.stats["failed"] == 1
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {secret}"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 1.0 and body["top_p"] == 1.0
    user = next(m for m in body["messages"] if m["role"] == "user")["content"]
    urls = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
    assert len(urls) == 2 * len(shots) + 2 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert secret not in caplog.text and secret not in repr(backend)


def _redness(url):
    import base64
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    r, g, b = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
    return r - (g + b) / 2


def test_http_backend_concurrent_requests_keep_their_order():
    """A judge that always prefers the redder query image is consistent; answers must stay matched
    to their prompts while several requests are in flight."""
    from PIL import Image

    def reply(body):
        user = next(m for m in body["messages"] if m["role"] == "user")["content"]
        urls = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
        first_redder = _redness(urls[-2]) > _redness(urls[-1])
        return 200, _chat(f"Prediction of user preference: {1 if first_redder else 2}")

    rng = np.random.default_rng(7)
    red, blue = Image.new("RGB", (24, 20), (220, 30, 30)), Image.new("RGB", (20, 28), (30, 30, 220))
    queries, want = [], []
    for i in range(6):
        red_first = bool(rng.integers(2))
        queries.append((_shots(rng), red if red_first else blue, blue if red_first else red, f"q{i}"))
        want.append(0 if red_first else 1)
    with _Server(reply) as srv:
        backend = OpenAIBackend("m", base_url=srv.url, api_key="k", workers=4, backoff=0.01)
        res = Judge(backend).compare_many(queries)
    assert [r.choice for r in res] == want and all(r.consistent for r in res)
    assert len(srv.requests) == 12


def test_http_backend_config_errors_raise(monkeypatch):
    with _Server([(401, {"error": "bad key"})]) as srv:
        backend = OpenAIBackend("m", base_url=srv.url, api_key="k", max_retries=3, backoff=0.01)
        rng = np.random.default_rng(2)
        with pytest.raises(RuntimeError, match="HTTP 401"):
            Judge(backend).compare(_shots(rng), _img(rng), _img(rng), "q")


def test_http_backend_unreachable_is_dropped():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    backend = OpenAIBackend("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=1, backoff=0.01,
                            timeout=2)
    rng = np.random.default_rng(3)
    r = Judge(backend).compare(_shots(rng), _img(rng), _img(rng), "q")
    assert r.choice is None and r.answers == (None, None) and backend.stats["failed"] == 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from ppd_engine.testing.tiny_vlm import make_tiny_llava

    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


def test_local_backend_on_tiny_vlm(tiny_folder):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(4)
        backend = LocalVLMBackend(tiny_folder, max_new_tokens=4, batch=4)
        judge = Judge(backend, seed=1)
        res = judge.compare_many([(_shots(rng), _img(rng), _img(rng), "q1"), (_shots(rng), _img(rng), _img(rng), "q2")])
        assert len(res) == 2
        for r in res:
            assert len(r.answers) == 2 and all(isinstance(x, str) for x in r.answers)
            # a random tiny model cannot produce the prediction line: dropped, never a crash
            assert r.choice is None and not r.consistent
        assert backend.generator.settings.temperature == 1.0 and backend.generator.settings.top_p == 1.0
    finally:
        torch.set_num_threads(n)


def test_cli_agreement_with_position_biased_server(tmp_path, monkeypatch):
    """A judge that always answers "1" is inconsistent on every pair: all dropped, none counted."""
    from ppd_engine.judge.__main__ import main
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    from ppd_engine.data.pickapic import PickAPicPairs, load_pairs

    write_pickapic_fixture(str(tmp_path / "d"))
    replies = [(200, _chat("Prediction of user preference: 1"))] * 200
    read, real = [], PickAPicPairs.with_images

    def spy(self, records):
        read.extend(records)
        return real(self, records)

    monkeypatch.setattr(PickAPicPairs, "with_images", spy)
    with _Server(replies) as srv:
        monkeypatch.setenv("PPD_JUDGE_BASE_URL", srv.url)
        monkeypatch.setenv("PPD_JUDGE_API_KEY", "k")
        out = tmp_path / "r.json"
        r = main(["agreement", "--data", str(tmp_path / "d"), "--judge", "http", "--judge-model", "m",
                  "--queries-per-user", "2", "--out", str(out), "--no-progress"])
    assert r["queries"] > 0 and r["dropped"] == r["queries"] and r["consistent"] == 0 and r["agreement"] is None
    # Only the judged pairs and their users' 4 shots were read (it used to load every JPEG of the
    # split); a query whose images do not decode is skipped and counted, not judged.
    users = {x.user_id for x in read}
    assert len(read) == 4 * len(users) + r["queries"] + r["skipped_bad_images"]
    assert len(read) < len(load_pairs(str(tmp_path / "d"), load_images=False, progress=False).records)
    assert json.loads(out.read_text())["queries"] == r["queries"]
    assert len(srv.requests) == 2 * r["queries"]


def test_cli_winrate_from_manifest(tmp_path, monkeypatch):
    from ppd_engine.judge.__main__ import main
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    write_pickapic_fixture(str(tmp_path / "d"))
    rng = np.random.default_rng(5)
    for name in ("a0.png", "b0.png", "a1.png", "b1.png"):
        _img(rng).save(tmp_path / name)
    rows = [{"user_id": "101", "caption": "c0", "image_a": "a0.png", "image_b": "b0.png"},
            {"user_id": "103", "caption": "c1", "image_a": "a1.png", "image_b": "b1.png"},
            {"user_id": "101", "caption": "c2", "image_a": "missing.png", "image_b": "b1.png"},
            {"user_id": "nobody", "caption": "c3", "image_a": "a0.png", "image_b": "b0.png"}]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json}\n")
    P = "Prediction of user preference: {}"
    replies = [(200, _chat(P.format(1))), (200, _chat(P.format(2))),     # A wins, consistently
               (200, _chat(P.format(2))), (200, _chat(P.format(2)))]     # inconsistent -> dropped
    with _Server(replies) as srv:
        monkeypatch.setenv("PPD_JUDGE_BASE_URL", srv.url)
        r = main(["winrate", "--data", str(tmp_path / "d"), "--manifest", str(manifest), "--judge", "http",
                  "--judge-model", "m", "--judge-workers", "1", "--no-progress"])
    assert (r["wins_a"], r["wins_b"], r["dropped"], r["win_rate_a"]) == (1, 0, 1, 1.0)
    assert r["skipped_no_shots"] == 1 and r["skipped_bad_rows"] == 2 and r["users"] == 2


# ---- credentials: redirects, echoed keys, OPENAI_* variables ------------------------------------

class _Recorder(_Server):
    """A loopback server on `host` recording every request's method and Authorization header and
    answering with `reply(method) -> (status, headers, body)`."""

    def __init__(self, host, reply):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                outer.requests.append((self.command, self.headers.get("Authorization")))
                status, headers, body = reply(self.command)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


def test_http_judge_never_sends_the_key_across_a_redirect():
    ok = json.dumps(_chat("Prediction of user preference: Image 1")).encode()
    with _Recorder("127.0.0.2", lambda m: (200, {"Content-Type": "application/json"}, ok)) as other:
        moved = {"Location": f"{other.base}/v1/chat/completions"}
        with _Recorder("127.0.0.1", lambda m: (302, moved, b"")) as first:
            backend = OpenAIBackend("m", base_url=f"{first.base}/v1", api_key="sk-secret-redirect-0001",
                                    max_retries=0)
            rng = np.random.default_rng(4)
            with pytest.raises(RuntimeError, match="redirect") as info:
                Judge(backend).compare(_shots(rng), _img(rng), _img(rng), "q")
        assert first.requests and first.requests[0][1] == "Bearer sk-secret-redirect-0001"
        assert all(auth is None for _, auth in other.requests)
        assert "sk-secret-redirect-0001" not in str(info.value)


def test_http_judge_redacts_a_key_echoed_in_an_error_body():
    key = "sk-echo-this-key-9876543210"
    body = json.dumps({"error": f"Incorrect API key provided: {key}"}).encode()
    with _Recorder("127.0.0.1", lambda m: (401, {"Content-Type": "application/json"}, body)) as srv:
        backend = OpenAIBackend("m", base_url=f"{srv.base}/v1", api_key=key, max_retries=0)
        rng = np.random.default_rng(5)
        with pytest.raises(RuntimeError, match="HTTP 401") as info:
            Judge(backend).compare(_shots(rng), _img(rng), _img(rng), "q")
    assert key not in str(info.value) and "[redacted]" in str(info.value)


def test_http_judge_reads_openai_variables(monkeypatch):
    ok = json.dumps(_chat("Prediction of user preference: Image 1")).encode()
    monkeypatch.delenv("PPD_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("PPD_JUDGE_API_KEY", raising=False)
    with _Recorder("127.0.0.1", lambda m: (200, {"Content-Type": "application/json"}, ok)) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{srv.base}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
        backend = OpenAIBackend("m", max_retries=0)
        assert backend.base_url == f"{srv.base}/v1" and "sk-from-openai-env" not in repr(backend)
        rng = np.random.default_rng(6)
        Judge(backend).compare(_shots(rng), _img(rng), _img(rng), "q")
        assert srv.requests[0][1] == "Bearer sk-from-openai-env"
        # The OpenAI key never goes to the engine's own endpoint variable's server.
        monkeypatch.setenv("PPD_JUDGE_BASE_URL", f"{srv.base}/v1")
        assert OpenAIBackend("m")._api_key is None
