"""The Pick-a-Pic world: real preference pairs and users on a diffusers base (SD1.5 / SDXL)."""
