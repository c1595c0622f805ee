"""VLM judge of user preferences with an order-consistency check (`python -m ppd_engine.judge`)."""
from .backends import LocalVLMBackend, OpenAIBackend, make_backend
from .core import Backend, Judge, JudgeResult, WinRate, parse_choice

__all__ = ["Backend", "Judge", "JudgeResult", "LocalVLMBackend", "OpenAIBackend", "WinRate", "make_backend", "parse_choice"]
