"""The "User Profile" section of a VLM's chain-of-thought generation.

The profile prompt (embed/profile_prompt.txt) asks for every pair's descriptions first and the
condensed profile last ("User Profile: ..."; the judge adds "Prediction of user preference: N").
Only that last section describes the user's taste in a few sentences; the full generation (often
hundreds of tokens of "Pair 1: Preferred Image: ...") is what the embedding is read from, but it
is useless as a caption suffix for the prompted-base baseline, whose text encoder sees 77 tokens.

Models decorate the header ("**User Profile:**", "### User Profile", "User profile -"), may put
the text on the next line, and may run out of tokens inside the section (truncated) or before it
(no profile). Both cases are reported, never silently papered over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# A header at the start of a line: optional markdown (#, *, _), "user profile", optional closing
# markdown, then ':' or '-' or the end of the line. The body runs to the next section the
# prompts define ("Prediction of user preference") or the end of the text.
_HEADER = re.compile(r"^[ \t>#*_]*user[ \t]+profile[ \t]*[*_]*[ \t]*(?::|-|–|$)[*_ \t]*",
                     re.IGNORECASE | re.MULTILINE)
_NEXT = re.compile(r"^[ \t#*_]*prediction of user preference", re.IGNORECASE | re.MULTILINE)
_PLACEHOLDER = "[description]"


@dataclass(frozen=True)
class ProfileSection:
    """text: the section's body (None when the generation has no profile section or an empty one);
    truncated: the generation stopped at its token budget inside the section."""

    text: str | None
    truncated: bool = False


def parse_profile(generation: str, hit_limit: bool = False) -> ProfileSection:
    """The last "User Profile" section of `generation`.

    hit_limit: the generation used its whole token budget (generated tokens == max_new_tokens),
    so whatever section it ended in was cut off. The template's own "[description]" echoed back
    counts as no profile."""
    heads = list(_HEADER.finditer(generation or ""))
    if not heads:
        return ProfileSection(None, False)
    start = heads[-1].end()
    nxt = _NEXT.search(generation, start)
    body = generation[start:nxt.start() if nxt else len(generation)]
    body = " ".join(body.replace("**", "").split())
    if not body or body == _PLACEHOLDER:
        return ProfileSection(None, hit_limit)
    return ProfileSection(body, hit_limit and nxt is None)


def profile_counts(sections: Iterable[ProfileSection]) -> dict[str, int]:
    """{"generations", "with_profile", "without_profile", "truncated"} over parsed sections."""
    secs = list(sections)
    with_p = sum(s.text is not None for s in secs)
    return {"generations": len(secs), "with_profile": with_p, "without_profile": len(secs) - with_p,
            "truncated": sum(s.truncated for s in secs)}
