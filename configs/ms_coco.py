r"""SFD on Stable Diffusion v1.5 (512x512 images, 64x64x4 KL-f8 latents, CLIP text conditions), NFE 2.

  python -m sfd_jax.convert --src=v1-5-pruned-emaonly.safetensors --arch=sd-v1 --dst=teachers/sd15
  python -m sfd_jax.main --config=configs/ms_coco.py --config.teacher=teachers/sd15 --config.teacher_arch= \
      --config.prompts=MS-COCO_val2014_30k_captions.csv --workdir=runs/ms_coco

(or `--config.teacher=v1-5-pruned-emaonly.safetensors`, whose preset `sd-v1` is set here). The
prompts file is the official one (a CSV with a `text` column, the 30k MS-COCO val2014 captions of
boomb0om/text2image-benchmark); `--config.tokenizer=PATH/tokenizer` reads the CLIP vocabulary from
a diffusers download instead of the installed open_clip_torch wheel.

Official values (zju-pi/diff-sampler sfd-main: `train.py` defaults, `training_loop.py`):
* `create_model` for `ms_coco`: sigma_min 0.1, sigma_max = sigma(1) of SD's table (14.6146...);
* 128 trajectories per Adam step: the loop forces `128 // batch` accumulation rounds for ms_coco
  (and counts `batch · rounds` = 128 images per iteration), here `train.batch = 128` split into
  micro-batches of `train.batch_per_device`; the loss is divided by 128;
* training runs the conditional branch only (`net.guidance_rate = 1.0`); guidance (7.5 in the
  sibling projects) is for sampling;
* prompts drawn per batch without repetition (`random.sample`; here from the run's JAX key);
* lr 5e-5, Adam (0.9, 0.999, 1e-8), lr / 10 from half of total_kimg, 200 kimg, num_steps 4 with
  AFS (NFE 2), M 3, teacher DPM-Solver++ with predict_x0 and lower_order_final (defaults).

Chosen here (the official code leaves them to the command line; launch.sh gives CIFAR-10 only):
* schedule 'discrete' with rho 1: the official default is polynomial rho 7, the sibling projects
  (AMED, diff-solvers) run SD with the discrete schedule and rho 1, and the student's re-derived
  discrete sub-schedules are only right for rho 1 (tests/fixtures/ldm/README.md);
* max_order 3 (train.py's default is None, which the DPM-Solver++ teacher cannot run; launch.sh
  uses 3; the sibling projects use 2 for SD);
* batch_per_device 2: the micro-batch of one accumulation round (memory bound; any divisor of
  128 / devices gives the same update up to rounding).
"""
from sfd_jax import config_types

SD_SIGMA_MAX = 14.614641189575195  # sigma(1) of SD v1's linear beta table (0.00085 -> 0.012), float32


def get_config():
  """Stable Diffusion v1.5 (`dataset_name='ms_coco'`), first stage, NFE 2."""
  config = config_types.default_config()
  config.teacher_arch = 'sd-v1'
  config.dataset_name = 'ms_coco'
  config.img_resolution = 512          # decoded images (the latents are 64x64x4)
  config.label_dim = 0
  config.distill.sigma_min = 0.1       # create_model: net.sigma_min = 0.1
  config.distill.sigma_max = SD_SIGMA_MAX
  config.distill.schedule_type = 'discrete'
  config.distill.schedule_rho = 1.0
  config.distill.max_order = 3
  config.train.batch = 128             # the official loop forces 128 trajectories per Adam step for ms_coco
  config.train.batch_per_device = 2
  return config
