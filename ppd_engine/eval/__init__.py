"""Evaluation of PPD checkpoints (`python -m ppd_engine.eval`): prompt sets (prompts.py), per-user
generation with shared seeds (generate.py), reward models (rewards.py), the VLM judge (judging.py),
the pipeline (evaluate.py), numbers and tables (report.py) and the β sweep (sweep.py)."""
