"""The "User Profile" section parsed out of real-looking chain-of-thought generations."""
from __future__ import annotations

from ppd_engine.profile import ProfileSection, parse_profile, profile_counts

PAIRS = """Pair 1:
Preferred Image: A watercolour fox in soft autumn light, loose brush strokes.
Dispreferred Image: A glossy 3D render of a fox with harsh rim lighting.
Differences: The preferred image is painterly and muted; the other is saturated and synthetic.

Pair 2:
Preferred Image: A misty lake drawn in ink.
Dispreferred Image: A photo-real lake at noon.
Differences: The user again picks the hand-made, low-contrast look. This suggests a user profile of soft styles.
"""


def test_profile_section_after_the_pairs():
    gen = PAIRS + "\nUser Profile: Prefers painterly, muted, hand-made styles\nover glossy photorealism.\n"
    sec = parse_profile(gen)
    assert sec == ProfileSection("Prefers painterly, muted, hand-made styles over glossy photorealism.", False)
    # "a user profile of soft styles" mid-sentence in pair 2 is not a header.
    assert "Pair 1" not in sec.text and "watercolour" not in sec.text


def test_markdown_header_next_line_and_judge_prediction():
    gen = PAIRS + "\n**User Profile:**\nLikes ink and watercolour.\n\nPrediction of user preference: 2\n"
    assert parse_profile(gen).text == "Likes ink and watercolour."
    gen = PAIRS + "\n### User profile\n- soft light\n- muted colour\n"
    assert parse_profile(gen).text == "- soft light - muted colour"


def test_no_profile_section_and_placeholder():
    assert parse_profile(PAIRS) == ProfileSection(None, False)
    assert parse_profile("") == ProfileSection(None, False)
    assert parse_profile(PAIRS + "User Profile: [description]\n").text is None
    # Ran out of tokens before the section: no profile, and it was cut off.
    assert parse_profile(PAIRS[:200], hit_limit=True) == ProfileSection(None, False)


def test_truncated_profile_is_kept_and_flagged():
    gen = PAIRS + "User Profile: Prefers painterly, muted styles and dislikes"
    assert parse_profile(gen, hit_limit=True) == ProfileSection("Prefers painterly, muted styles and dislikes", True)
    # The budget ran out after the profile (inside the judge's prediction): the profile is whole.
    judged = PAIRS + "User Profile: Likes ink.\nPrediction of user preference:"
    assert parse_profile(judged, hit_limit=True) == ProfileSection("Likes ink.", False)
    counts = profile_counts([parse_profile(gen, True), parse_profile(PAIRS), parse_profile(judged)])
    assert counts == {"generations": 3, "with_profile": 2, "without_profile": 1, "truncated": 1}
