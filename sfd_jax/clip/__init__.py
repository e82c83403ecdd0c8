"""CLIP for the Stable Diffusion teacher: the offline tokenizers, SD's text encoder, and the
CLIP score of the official `clip_score.py` (open_clip's ViT-g-14 family)."""
from sfd_jax.clip.open_clip_model import VIT_G_14, OpenCLIPConfig  # noqa: F401
from sfd_jax.clip.prompts import PromptsError, draw_prompts, read_prompts  # noqa: F401
from sfd_jax.clip.score import CLIPScore, clip_score, load_open_clip  # noqa: F401
from sfd_jax.clip.sd_text_encoder import (SD_V1, TextEncoderConfig, encode_jit, encode_prompts,  # noqa: F401
                                         text_encoder_params)
from sfd_jax.clip.tokenizer import VocabularyError, load_vocabulary, open_clip_tokenize, sd_tokenize  # noqa: F401
from sfd_jax.clip.weights import CLIPWeightsError  # noqa: F401
