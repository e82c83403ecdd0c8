r"""The embedded demo teacher: a small EDM (DDPM++) model of scikit-learn's 8x8 digits.

  python -m sfd_jax.demo.pretrain --config=configs/demo_teacher.py --workdir=runs/demo_teacher

Writes runs/demo_teacher/teacher (a converted directory, EMA weights); the committed copy
lives in sfd_jax/demo/assets/digits_teacher.
"""
import ml_collections


def get_config():
  """Returns the teacher-training config (EDM's recipe, sized for a 2-core CPU)."""
  config = ml_collections.ConfigDict()
  config.seed = 0                     # init and training RNG: jax.random.key(seed)

  config.data = ml_collections.ConfigDict()
  config.data.resolution = 8          # 8 = native digits; 16 = every pixel doubled

  n = config.network = ml_collections.ConfigDict()
  n.precond = 'EDMPrecond'
  n.sigma_data = 0.5
  n.model_type = 'SongUNet'           # DDPM++
  n.embedding_type = 'positional'
  n.encoder_type = 'standard'
  n.decoder_type = 'standard'
  n.channel_mult_noise = 1
  n.resample_filter = [1, 1]
  n.model_channels = 16
  n.channel_mult = [1, 2]             # 8x8 and 4x4
  n.channel_mult_emb = 4
  n.num_blocks = 1
  n.attn_resolutions = [4]
  n.dropout = 0.1                     # also the SFD student's dropout
  n.augment_dim = 0                   # no augmentation

  loss = config.loss = ml_collections.ConfigDict()
  loss.P_mean = -1.2                  # ln(sigma) ~ N(P_mean, P_std^2)
  loss.P_std = 1.2
  loss.sigma_data = 0.5

  t = config.train = ml_collections.ConfigDict()
  t.batch_size = 128
  t.num_steps = 4000                 # 512k images, ~285 passes over the digits
  t.lr = 2e-3                         # Adam
  t.lr_rampup_kimg = 32.0             # linear ramp-up over the first 250 steps
  t.ema_halflife_kimg = 50.0          # EDM-style EMA half-life, in thousands of images
  t.ema_rampup_ratio = 0.05           # early on the half-life is 5% of the images seen
  t.log_every = 100
  t.save_every = 1000                 # intermediate teacher-STEP directories
  return config
