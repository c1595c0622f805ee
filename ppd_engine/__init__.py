"""ppd_engine: Personalized Preference fine-tuning of Diffusion models (PPD) with fused C++/CUDA ops."""

__version__ = "0.1.0"
