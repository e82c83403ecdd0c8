r"""Default SFD distillation config: every field, with the official CIFAR-10 2-NFE values.

The per-data-set configs import this and override a few lines. Any field can be overridden
on the command line, e.g.:

  python -m sfd_jax.main --config=configs/default.py --config.teacher=PATH --workdir=runs/x \
      --config.train.total_kimg=10
"""
import ml_collections


def get_config():
  """Returns the default config (official SFD first stage, CIFAR-10, NFE 2)."""
  config = ml_collections.ConfigDict()
  config.teacher = ''                 # EDM snapshot pickle or converted directory (required)
  config.dataset_name = 'cifar10'     # informational; recorded with the student
  config.img_resolution = 0           # expected teacher resolution (checked at load); 0 accepts any
  config.label_dim = -1               # expected teacher label dimension (checked at load); -1 accepts any

  d = config.distill = ml_collections.ConfigDict()
  d.num_steps = 4                     # student time points; NFE = num_steps - 2 with AFS
  d.M = 3                             # teacher steps inserted per student interval
  d.sampler_tea = 'dpmpp'             # teacher solver: euler | heun | dpm | dpmpp | ipndm
  d.max_order = 3                     # teacher order (DPM-Solver++ 1..3, iPNDM 1..4)
  d.predict_x0 = True                 # DPM-Solver++ in data-prediction form
  d.lower_order_final = True          # DPM-Solver++ lowers its order at the final steps
  d.thresholding = True               # official dynamic thresholding of the teacher's x0 history
  d.schedule_type = 'polynomial'      # polynomial | logsnr | time_uniform
  d.schedule_rho = 7.0                # polynomial / time_uniform exponent
  d.afs = True                        # analytical first step (saves one NFE)
  d.sigma_min = 0.006                 # SFD's sigma_min for EDM teachers
  d.sigma_max = 80.0
  d.use_step_condition = False        # SFD-v: num_steps drawn from {4,5,6,7} each iteration

  o = config.optim = ml_collections.ConfigDict()
  o.lr = 5e-5                         # Adam learning rate
  o.b1 = 0.9                          # Adam beta1
  o.b2 = 0.999                        # Adam beta2
  o.eps = 1e-8                        # Adam epsilon (torch placement: after the sqrt)
  o.lr_drop_factor = 0.1              # lr multiplier once cur_kimg >= total_kimg / 2

  t = config.train = ml_collections.ConfigDict()
  t.batch = 128                       # global batch: trajectories per iteration, all devices
  t.total_kimg = 200.0                # thousands of trajectories to train for
  t.kimg_per_tick = 1.0               # progress line every this many kimg
  t.checkpoint_ticks = 10             # Orbax checkpoint + sample grid every this many ticks
  t.max_checkpoints = 3               # checkpoints kept in the workdir
  t.grid_size = 8                     # sample grid is grid_size x grid_size images
  t.seed = 0                          # everything random derives from jax.random.key(seed)
  t.dropout = -1.0                    # student dropout; < 0 keeps the teacher network's rate
  t.distributed = False               # multi-host: call jax.distributed.initialize()
  t.compilation_cache = ''            # persistent XLA cache dir: a resumed run skips recompiling
  t.is_second_stage = False           # 1-NFE second stage with LPIPS (not implemented)
  t.demo_report = False               # after training, write sfd_jax.demo's report (demo config)
  return config
