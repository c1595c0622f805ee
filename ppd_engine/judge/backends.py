"""Judge backends: a local transformers VLM, or an OpenAI-compatible chat-completions endpoint."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request

from ppd_engine.embed.prompt import ImageSlot, Prompt

log = logging.getLogger(__name__)

ENV_BASE_URL = "PPD_JUDGE_BASE_URL"
ENV_API_KEY = "PPD_JUDGE_API_KEY"
# The ecosystem's variables, read when the engine's own are unset.
OPENAI_BASE_URL = "OPENAI_BASE_URL"
OPENAI_API_KEY = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
_REDACTED = "[redacted]"
# Things that look like credentials in a server's error text, whatever key we sent.
_SECRET_RE = re.compile(r"(Bearer\s+)\S+|\bsk-[A-Za-z0-9_\-]{8,}")


def _endpoint(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """(base URL, key): arguments first, then $PPD_JUDGE_*, then $OPENAI_*. $OPENAI_API_KEY is used
    only with $OPENAI_BASE_URL or OpenAI's own URL, so it is never sent to an endpoint named some
    other way (e.g. a local server in $PPD_JUDGE_BASE_URL)."""
    env = os.environ
    if base_url or env.get(ENV_BASE_URL):
        url, openai_url = base_url or env[ENV_BASE_URL], False
    else:
        url, openai_url = env.get(OPENAI_BASE_URL) or DEFAULT_BASE_URL, True
    if api_key is None:
        api_key = env.get(ENV_API_KEY) or (env.get(OPENAI_API_KEY) if openai_url else None)
    return url.rstrip("/"), api_key


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would resend the Authorization header to wherever the
    Location points. The 3xx surfaces as an HTTPError instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class LocalVLMBackend:
    """A transformers VLM (LLaVA-OneVision, Qwen2-VL, ...) run locally; prompts decoded in batches."""

    name = "local"

    def __init__(self, model_or_source, processor=None, device: str = "cpu", dtype="fp32",
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 1024, batch: int = 4):
        from ppd_engine.embed.generate import GenerationSettings, VLMGenerator
        from ppd_engine.embed.vlm import load_vlm

        if isinstance(model_or_source, str):
            self.source = model_or_source
            model, processor = load_vlm(model_or_source, device=device, dtype=dtype)
        else:
            if processor is None:
                raise ValueError("LocalVLMBackend(model, processor): the processor is required with a model object")
            model, self.source = model_or_source, getattr(model_or_source, "name_or_path", "")
            processor.tokenizer.padding_side = "left"
        settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=temperature == 0,
                                      temperature=temperature if temperature > 0 else 1.0, top_p=top_p)
        self.generator = VLMGenerator(model, processor, settings)
        self.batch = max(1, batch)

    def answer(self, prompts: list[Prompt], seed: int) -> list[str | None]:
        out: list[str | None] = []
        for i in range(0, len(prompts), self.batch):
            res = self.generator.generate(prompts[i:i + self.batch], seed=seed + i, want_states=False)
            out += res.texts
        return out


class OpenAIBackend:
    """Any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, SGLang, TGI, ...).

    The base URL and API key come from $PPD_JUDGE_BASE_URL / $PPD_JUDGE_API_KEY unless given, else from
    $OPENAI_BASE_URL / $OPENAI_API_KEY (see `_endpoint`); the key is sent only in the Authorization
    header, never across a redirect (a 3xx raises), and never logged or printed: error bodies are
    shown with it (and anything key-like) redacted. 429 and 5xx responses, timeouts and
    connection errors are retried with exponential backoff (honouring Retry-After); a request that
    still fails yields None (the judgement is then dropped as inconsistent). Other 4xx answers mean
    a wrong model name, URL or key, which every later request would repeat, so they raise."""

    name = "http"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 1024, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, image_format: str = "JPEG",
                 workers: int = 4):
        self.model = model
        self.base_url, self._api_key = _endpoint(base_url, api_key)
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.image_format = image_format.upper()
        self.workers = max(1, workers)
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, key={'set' if self._api_key else 'unset'})"

    def messages(self, prompt: Prompt) -> list[dict]:
        """OpenAI chat messages: text parts and base64 data-URL image parts, in prompt order."""
        images = iter(prompt.images)
        msgs = []
        for m in prompt.messages:
            if all(isinstance(p, str) for p in m.parts):
                msgs.append({"role": m.role, "content": "".join(m.parts)})
                continue
            content = []
            for p in m.parts:
                if isinstance(p, ImageSlot):
                    content.append({"type": "image_url", "image_url": {"url": self._data_url(next(images))}})
                else:
                    content.append({"type": "text", "text": p})
            msgs.append({"role": m.role, "content": content})
        return msgs

    def _data_url(self, image) -> str:
        buf = io.BytesIO()
        image.save(buf, format=self.image_format, **({"quality": 95} if self.image_format == "JPEG" else {}))
        mime = "jpeg" if self.image_format == "JPEG" else self.image_format.lower()
        return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def answer(self, prompts: list[Prompt], seed: int) -> list[str | None]:
        """Answers in prompt order; up to `workers` requests in flight (the endpoint's latency, not
        our CPU, bounds a judge run)."""
        if self.workers == 1 or len(prompts) == 1:
            return [self._complete(p, seed + i) for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(prompts))) as pool:
            return list(pool.map(lambda ip: self._complete(ip[1], seed + ip[0]), enumerate(prompts)))

    def _redact(self, text: str) -> str:
        """`text` with our key, and anything that looks like a key, replaced: servers echo headers."""
        if self._api_key:
            text = text.replace(self._api_key, _REDACTED)
        return _SECRET_RE.sub(lambda m: (m.group(1) or "") + _REDACTED, text)

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _complete(self, prompt: Prompt, seed: int) -> str | None:
        body = json.dumps({"model": self.model, "messages": self.messages(prompt), "temperature": self.temperature,
                           "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": seed}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            retry_after = None
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return _content(resp.read())
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    where = self._redact(str(e.headers.get("Location", "?")))
                    raise RuntimeError(f"judge endpoint {url} answered HTTP {e.code}, a redirect to {where}; "
                                       "redirects are not followed (the API key would go along): set the base "
                                       f"URL (${ENV_BASE_URL}) to the final address") from None
                if e.code != 429 and e.code < 500:
                    detail = self._redact(e.read()[:300].decode("utf-8", "replace"))
                    raise RuntimeError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
                retry_after = _retry_after(e.headers.get("Retry-After"))
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                why = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            if attempt == self.max_retries:
                self._count("failed")
                log.warning("judge request to %s failed after %d attempts (%s); judgement dropped",
                            url, attempt + 1, why)
                return None
            self._count("retries")
            delay = retry_after if retry_after is not None else min(self.max_backoff, self.backoff * 2 ** attempt)
            time.sleep(delay * (1.0 + 0.1 * random.random()))  # jitter spreads out concurrent clients
        return None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _content(raw: bytes) -> str | None:
    """Assistant text of a chat-completions response; None if the body is not one."""
    try:
        msg = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if isinstance(msg, list):  # some servers return content parts
        msg = "".join(p.get("text", "") for p in msg if isinstance(p, dict))
    return msg if isinstance(msg, str) else None


def make_backend(kind: str, model: str, *, device: str | None = None, dtype: str | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 1024, batch: int = 4,
                 timeout: float = 120.0, max_retries: int = 5, workers: int = 4):
    """A judge backend by name: "local" (transformers VLM hub id / folder in `model`) or "http"
    (OpenAI-compatible endpoint serving `model`; URL and key from $PPD_JUDGE_BASE_URL / $PPD_JUDGE_API_KEY,
    else $OPENAI_BASE_URL / $OPENAI_API_KEY)."""
    if kind == "http":
        return OpenAIBackend(model, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                             timeout=timeout, max_retries=max_retries, workers=workers)
    if kind != "local":
        raise ValueError(f"judge backend must be 'local' or 'http', got {kind!r}")
    from ppd_engine.embed.vlm import default_device

    device = device or default_device()
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return LocalVLMBackend(model, device=device, dtype=dtype, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch=batch)
