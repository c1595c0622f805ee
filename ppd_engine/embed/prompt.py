"""The chain-of-thought prompt behind user profiles and the VLM judge.

A jinja2 template (default: `profile_prompt.txt` beside this file) is rendered into chat messages
whose content interleaves text and images. Backends turn that one structure into what they need:
ChatML text with the processor's image placeholder for LLaVA-OneVision (`to_chatml`), the
processor's own chat template for other local VLMs, or OpenAI-style content parts for HTTP judges.
We render interleaving ourselves because LLaVA-OneVision's chat template moves every image of a
message to its front, which would detach each image from its caption and label.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

DEFAULT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile_prompt.txt")
ROLES = ("system", "user", "assistant")
_ROLE_LINE = re.compile(r"^\[\[(system|user|assistant)\]\][ \t]*$", re.MULTILINE)
IMAGE_MARK = "[[image]]"


class ImageSlot:
    """Marks where an image goes inside a message's content."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<image>"


IMAGE = ImageSlot()


@dataclass
class Message:
    role: str
    parts: list[Any]  # str | IMAGE, in reading order


@dataclass
class Prompt:
    """Rendered prompt: messages plus the images the IMAGE slots refer to, in order."""

    messages: list[Message]
    images: list[Any] = field(default_factory=list)  # PIL images

    def text_only(self) -> str:
        """The prompt with images shown as <image> (for logs and the sidecar)."""
        return "\n".join(f"[{m.role}] " + "".join(p if isinstance(p, str) else "<image>" for p in m.parts)
                         for m in self.messages)


def as_pil(image, what: str = "image"):
    """A PIL RGB image from a PIL image or encoded bytes; ValueError naming `what` if undecodable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode {what}: {e}") from e
        return img.convert("RGB")
    raise ValueError(f"{what} must be a PIL image or encoded bytes, got {type(image).__name__}")


class ProfileTemplate:
    """A profile-prompt template file; `sha256` identifies its exact text in stores and reports."""

    def __init__(self, path: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.path = os.path.abspath(path or DEFAULT_TEMPLATE)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"prompt template not found: {self.path}")
        with open(self.path, encoding="utf-8") as f:
            self.text = f.read()
        self.sha256 = hashlib.sha256(self.text.encode("utf-8")).hexdigest()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
        self._template = env.from_string(self.text)

    def render(self, shots: Sequence[Any], query: tuple[str, Any, Any] | None = None) -> Prompt:
        """Render for `shots` (objects with caption, image_w, image_l, uid_w, uid_l) and optionally
        a query pair (caption, image_1, image_2) for the judge."""
        if not shots:
            raise ValueError("the profile prompt needs at least one few-shot pair")
        images = []
        for s in shots:
            images.append(as_pil(s.image_w, f"preferred image {getattr(s, 'uid_w', '?')}"))
            images.append(as_pil(s.image_l, f"dispreferred image {getattr(s, 'uid_l', '?')}"))
        qvars = None
        if query is not None:
            caption, img_1, img_2 = query
            images += [as_pil(img_1, "query image 1"), as_pil(img_2, "query image 2")]
            qvars = {"caption": caption}
        text = self._template.render(pairs=[{"caption": s.caption} for s in shots], query=qvars)
        messages = _split_messages(text, self.path)
        n_slots = sum(isinstance(p, ImageSlot) for m in messages for p in m.parts)
        if n_slots != len(images):
            raise ValueError(f"template {self.path} has {n_slots} {IMAGE_MARK} slots for {len(images)} images "
                             f"({len(shots)} pairs{' + query' if query else ''})")
        return Prompt(messages, images)


def _split_messages(text: str, where: str) -> list[Message]:
    pieces = _ROLE_LINE.split(text)
    if pieces[0].strip():
        raise ValueError(f"template {where}: text before the first [[system]]/[[user]] line")
    messages = []
    for role, body in zip(pieces[1::2], pieces[2::2]):
        body = body.strip("\n")
        parts: list[Any] = []
        for i, chunk in enumerate(body.split(IMAGE_MARK)):
            if i:
                parts.append(IMAGE)
            if chunk:
                parts.append(chunk)
        messages.append(Message(role, parts))
    if not messages:
        raise ValueError(f"template {where}: no [[system]]/[[user]] message")
    return messages


def to_chatml(prompt: Prompt, image_token: str) -> str:
    """ChatML text (the Qwen2 chat format LLaVA-OneVision was tuned on), ready for generation."""
    out = []
    for m in prompt.messages:
        body = "".join(p if isinstance(p, str) else image_token for p in m.parts)
        out.append(f"<|im_start|>{m.role}\n{body}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def to_hf_conversation(prompt: Prompt) -> list[dict]:
    """Messages for `processor.apply_chat_template` (for VLMs whose template keeps interleaving)."""
    conv = []
    for m in prompt.messages:
        conv.append({"role": m.role, "content": [{"type": "text", "text": p} if isinstance(p, str)
                                                 else {"type": "image"} for p in m.parts]})
    return conv
