"""VLM judge: which of two images would this user prefer, with an order-consistency check.

The judge sees the user's few-shot pairs (the same chain-of-thought prompt as the user profiles)
and a new, unlabelled pair, and must end with "Prediction of user preference: 1 or 2". Each
comparison is asked twice, (A, B) and (B, A); a judgement is kept only when both answers pick the
same image. Malformed answers (no parsable prediction) count as inconsistent, so a judgement is
either consistent or dropped, never a crash.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ppd_engine.embed.prompt import Prompt, ProfileTemplate

_PREDICTION = re.compile(r"prediction\s+of\s+(?:the\s+)?user(?:'s)?\s+preference", re.IGNORECASE)


class Backend(Protocol):
    """Answers rendered judge prompts; one answer text (or None on a failed request) per prompt."""

    name: str

    def answer(self, prompts: list[Prompt], seed: int) -> list[str | None]: ...


@dataclass(frozen=True)
class JudgeResult:
    choice: int | None          # 0: image_a preferred, 1: image_b preferred, None: dropped
    consistent: bool            # both orders parsed and agreed
    answers: tuple              # (answer to (A, B), answer to (B, A)), raw text or None


@dataclass
class WinRate:
    wins_a: int
    wins_b: int
    dropped: int                # inconsistent or malformed judgements

    @property
    def judged(self) -> int:
        return self.wins_a + self.wins_b

    @property
    def win_rate_a(self) -> float | None:
        """Share of consistent judgements won by A (None when all were dropped)."""
        return self.wins_a / self.judged if self.judged else None

    def as_dict(self) -> dict:
        return {"wins_a": self.wins_a, "wins_b": self.wins_b, "dropped": self.dropped, "judged": self.judged,
                "win_rate_a": self.win_rate_a}


def parse_choice(answer: str | None) -> int | None:
    """1 or 2 from the answer's last "Prediction of user preference: ..." line; None if that line
    is missing or names both or neither (e.g. an echoed "[1 or 2]")."""
    if not answer:
        return None
    matches = list(_PREDICTION.finditer(answer))
    if not matches:
        return None
    rest = answer[matches[-1].end():]
    line = rest.lstrip(" \t:*-").split("\n", 1)[0]
    if not line.strip():  # the answer may be on the following line
        tail = rest.split("\n")
        line = next((t for t in tail[1:] if t.strip()), "")
    found = set(re.findall(r"(?<!\d)([12])(?!\d)", line))
    return int(found.pop()) if len(found) == 1 else None


class Judge:
    """Order-consistent pairwise judge over any `Backend` (sampling settings live in the backend;
    the paper's are temperature 1.0, top_p 1.0, the backends' defaults)."""

    def __init__(self, backend: Backend, template: ProfileTemplate | str | None = None, seed: int = 0):
        self.backend = backend
        self.template = template if isinstance(template, ProfileTemplate) else ProfileTemplate(template)
        self.seed = seed
        self._calls = 0

    def _prompts(self, shots: Sequence[Any], image_a, image_b, caption: str) -> list[Prompt]:
        return [self.template.render(shots, (caption, image_a, image_b)),
                self.template.render(shots, (caption, image_b, image_a))]

    def compare(self, shots: Sequence[Any], image_a, image_b, caption: str) -> JudgeResult:
        """Which of image_a / image_b the user with few-shot pairs `shots` prefers for `caption`."""
        return self.compare_many([(shots, image_a, image_b, caption)])[0]

    def compare_many(self, queries: Sequence[tuple]) -> list[JudgeResult]:
        """`compare` for several (shots, image_a, image_b, caption) at once (one backend call)."""
        prompts = []
        for shots, a, b, caption in queries:
            prompts += self._prompts(shots, a, b, caption)
        seed = self.seed * 1_000_003 + self._calls
        self._calls += 1
        answers = self.backend.answer(prompts, seed)
        if len(answers) != len(prompts):
            raise RuntimeError(f"backend {self.backend.name} returned {len(answers)} answers for {len(prompts)} prompts")
        return [_decide(answers[2 * i], answers[2 * i + 1]) for i in range(len(queries))]

    def winrate(self, shots: Sequence[Any], images_a: Sequence[Any], images_b: Sequence[Any],
                captions: Sequence[str], batch: int = 1) -> WinRate:
        """Wins of set A vs set B for one user: images_a[i] vs images_b[i] for captions[i]."""
        if not len(images_a) == len(images_b) == len(captions):
            raise ValueError(f"winrate needs as many images_a ({len(images_a)}), images_b ({len(images_b)}) "
                             f"and captions ({len(captions)})")
        wr = WinRate(0, 0, 0)
        queries = [(shots, a, b, c) for a, b, c in zip(images_a, images_b, captions)]
        for i in range(0, len(queries), max(1, batch)):
            for r in self.compare_many(queries[i:i + max(1, batch)]):
                if r.choice is None:
                    wr.dropped += 1
                elif r.choice == 0:
                    wr.wins_a += 1
                else:
                    wr.wins_b += 1
        return wr


def _decide(ans_ab: str | None, ans_ba: str | None) -> JudgeResult:
    c1, c2 = parse_choice(ans_ab), parse_choice(ans_ba)
    # In the (A, B) prompt "1" is A; in the swapped prompt "2" is A.
    pick1 = None if c1 is None else c1 - 1
    pick2 = None if c2 is None else 2 - c2
    consistent = pick1 is not None and pick1 == pick2
    return JudgeResult(pick1 if consistent else None, consistent, (ans_ab, ans_ba))
