"""The CLIP score of the official SFD `clip_score.py` on image files (`calc --images --num --seed`).

  params, config = fid.load_open_clip('open_clip_pytorch_model.bin')   # ViT-g-14, never fetched
  result = fid.folder_clip_score('out/', clip.read_prompts('captions.csv'), params, config)
  result.mean                                                           # what clip_score.py prints
  fid.clip_score(images_uint8, captions, params, config)               # arrays already in memory

The model, preprocessing and score live in `sfd_jax.clip`; this module reads the images.
"""
from typing import Optional, Sequence

from sfd_jax.clip import score
from sfd_jax.clip.score import CLIPScore, RunningScore, clip_score, load_open_clip  # noqa: F401  (the fid face)
from sfd_jax.fid import evaluate, sources


def folder_clip_score(image_path, captions: Sequence[str], params, config: score.OpenCLIPConfig,
                      num: Optional[int] = None, seed: int = 0, vocab=None,
                      batch_size: int = score.DEFAULT_BATCH, progress: bool = False) -> score.CLIPScore:
  """`clip_score.py calc --images=PATH [--num --seed]` as a library call.

  The images are read as sfd-main's `ImageFolderDataset` reads them (sorted, recursive; a zip
  or `.npz` works too); with `num` a sorted random subset (`RandomState(seed)`, EDM's
  `max_size`) is taken, and, as in the official code, the k-th chosen image is paired with
  caption k (captions are not subset with the images).

  Args:
    image_path: image folder, EDM zip, or `.npz` of samples.
    captions: at least as many captions as images used (e.g. `sfd_jax.clip.read_prompts(csv)`).
    params, config: from `load_open_clip`.
    num, seed: use a random `num` of the images.
    vocab: the BPE vocabulary (default: open_clip's installed one).
    batch_size: images per device call.
    progress: show a progress bar.

  Returns:
    `CLIPScore(mean, scores)`.

  Raises:
    ValueError: fewer captions than images used (one line naming `image_path`).
  """
  source = sources.open_source(image_path)
  indices = sources.subset(source.count, num, seed)
  if len(captions) < len(indices):
    raise ValueError(f'{image_path}: {len(indices)} images but only {len(captions)} captions')
  batches = evaluate.source_batches(source, indices, batch_size, progress, desc='clip score')
  return score.scores_of_batches(batches, captions[:len(indices)], params, config, vocab, batch_size)
