"""Preference data: Pick-a-Pic v2 pairs, users and splits."""
