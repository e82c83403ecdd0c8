"""CLIP for the Stable Diffusion teacher: the offline tokenizers, SD's text encoder, and the
CLIP score of the official `clip_score.py` (open_clip's ViT-g-14 family)."""
