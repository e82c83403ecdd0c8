r"""Times the official SFD training iteration and sfd_jax's side by side, alternately, in one run.

The official code (zju-pi/diff-sampler, folder sfd-main) is not part of this repository: fetch
it yourself and pass its path. Each implementation runs in its own worker process (so each
one's peak memory is its own); the workers build their network, compile / warm up, then run
one iteration each in turn, `--rounds` times, so that a change in machine load hits both alike.

Configuration (both sides): EDM's CIFAR-10 DDPM++ (SongUNet, VPPrecond, 32x32) with the SFD
step-condition layers (the released 60.4M-parameter student), random weights, first-stage SFD
at NFE 2: num_steps 4, AFS, M 3, DPM-Solver++(3) teacher, polynomial schedule; Adam lr 5e-5.
One iteration = 12 teacher evaluations (no grad) + 2 student forward/backward/Adam steps.

  git --git-dir=... archive HEAD sfd-main | tar -x -C /tmp/ext     # the official checkout
  python experiments/bench_vs_official.py --official=/tmp/ext/sfd-main --batch=8 --rounds=3

`--model=lsun_bedroom_ldm`: CompVis' LSUN-Bedroom LDM-4 instead (the official yaml
lsun_bedrooms-ldm-vq-4.yaml: UNet 224 channels with the step-condition layers, 64x64x3 latents,
VQ-f4 first stage, LitEma; random weights, the first stage's ckpt_path dropped), wrapped in
`CFGPrecond` as their `create_model('lsun_bedroom_ldm')`; discrete schedule with rho 1, sigma in
[0.006, sigma(1)], the teacher inside `ema_scope()`, condition None (their LDM branch passes an
unassigned `c[k]`; README). sfd_jax builds the same architecture from the preset
`ldm-lsun-bedroom` with random weights (experiments/latent_random.py). Their LDM code needs
omegaconf, pytorch-lightning, einops and taming-transformers-rom1504, which this project does not
install: put them in a separate environment with torch and name its interpreter with
`--official_python` (the official worker runs there; see experiments/RESULTS.md for the one used).
There, `torchvision` (imported by their ddpm.py for image-logging `make_grid` only) is replaced
by an empty stand-in after Lightning is imported.

  python experiments/bench_vs_official.py --official=/tmp/ext/sfd-main --model=lsun_bedroom_ldm \
      --official_python=/tmp/offvenv/bin/python --batch=2 --rounds=2

`--model=ms_coco`: Stable Diffusion v1.5 (their v1-inference.yaml: UNet 320 channels with
cross-attention and `use_checkpoint: True`, KL-f8 first stage, CLIP ViT-L/14 text encoder; random
weights) in their classifier-free `CFGPrecond` with `guidance_rate = 1.0` as their loop trains it;
sigma in [0.1, sigma(1)], discrete schedule with rho 1 (configs/ms_coco.py); one accumulation
round of `--batch` prompts per iteration, conditions encoded by the text encoder in each
iteration (their `get_learned_conditioning`; our jitted batch function). Their
`FrozenCLIPEmbedder` loads `openai/clip-vit-large-patch14` from the Hugging Face hub, which this
machine cannot reach: the official worker builds transformers' `CLIPTextModel` from the ViT-L/14
text config with random weights instead, and its tokenizer is a stand-in that returns fixed ids
(BOS, 8 word ids, EOS padding: tokenising is host string work, not part of the compute compared).
Their encoders module also imports `clip` and `kornia` for other encoders: empty stand-ins. That
environment needs `transformers` besides the LDM dependencies.

  python experiments/bench_vs_official.py --official=/tmp/ext/sfd-main --model=ms_coco \
      --official_python=/tmp/offvenv/bin/python --batch=1 --rounds=1 --sequential

The official side is their own code imported by sys.path: `training.loss.loss` (teacher
trajectory + student Euler step), their `EDMPrecond`, torch.optim.Adam with their arguments,
and the body of `training_loop.training_loop` for one GPU and one accumulation round (zero_grad,
loss, backward of sum/batch, nan_to_num on the grads, step; no backward at the AFS step),
without DDP (a single process). Their network runs in fp16 on CUDA (`net.use_fp16 = True`, as
their loop sets) and in fp32 on CPU. Modules their code imports but this iteration never uses
(`piq` for the second stage's LPIPS, always; `requests` for downloads, when missing) are
replaced by empty stand-ins.
"""
import argparse
import copy
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
TAG = '@@ '  # prefix of the workers' protocol lines on stdout
SFD = dict(num_steps=4, M=3, sampler_tea='dpmpp', max_order=3, predict_x0=True, lower_order_final=True,
           schedule_type='polynomial', schedule_rho=7.0, afs=True, sigma_min=0.006, sigma_max=80.0)
LR = 5e-5
MODELS = ('cifar10', 'lsun_bedroom_ldm', 'ms_coco')
LATENT = {'lsun_bedroom_ldm': 'ldm-lsun-bedroom', 'ms_coco': 'sd-v1'}  # model -> sfd_jax preset


def settings_of(model: str) -> dict:
  """The first-stage SFD settings of the benchmarked teacher; the LDM's sigma_max is its sigma(1),
  filled in by each worker from its own network."""
  if model == 'lsun_bedroom_ldm':
    return dict(SFD, schedule_type='discrete', schedule_rho=1.0, sigma_max=None)
  if model == 'ms_coco':  # their create_model: sigma_min 0.1; configs/ms_coco.py
    return dict(SFD, schedule_type='discrete', schedule_rho=1.0, sigma_min=0.1, sigma_max=None)
  return dict(SFD)


PROMPT_IDS = [320, 1929, 3309, 525, 518, 2077, 539, 320]  # 'a bedroom with ...'-like word ids: any 8 do


def fixed_token_ids(length: int = 77) -> list:
  """The one prompt both sides encode: BOS, PROMPT_IDS, EOS padding (SD's CLIP tokenizer layout)."""
  return [49406, *PROMPT_IDS] + [49407] * (length - 1 - len(PROMPT_IDS))


def say(**kwargs):
  print(TAG + json.dumps(kwargs), flush=True)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ------------------------------------------------------------------------- official (torch)

def _stand_in(name, always=False, **attrs):
  """An empty module for an import the benchmarked code path never uses (when missing, or always)."""
  if not always:
    try:
      __import__(name)
      return
    except Exception:  # missing, or broken by a mismatched dependency
      pass
  module = types.ModuleType(name)
  module.__dict__.update(attrs)
  sys.modules[name] = module


def _official_ldm_net(official, device):
  """Their LatentDiffusion (random weights) for LSUN-Bedroom in their CFGPrecond, as create_model."""
  import pytorch_lightning  # noqa: F401  (first: with the stand-in below Lightning would think torchvision usable)
  _stand_in('torchvision', always=True)
  _stand_in('torchvision.utils', always=True, make_grid=None)  # ddpm.py: image logging only
  from omegaconf import OmegaConf
  from models.ldm.util import instantiate_from_config  # noqa: E402  (their code, by sys.path)
  from models.networks_edm import CFGPrecond  # noqa: E402
  config = OmegaConf.load(official / 'models/ldm/configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml')
  del config.model.params.first_stage_config.params['ckpt_path']  # random weights
  net = CFGPrecond(instantiate_from_config(config.model), img_resolution=64, img_channels=3, guidance_rate=1.,
                   guidance_type='uncond', label_dim=0).to(device)
  net.sigma_min = SFD['sigma_min']
  return net


class _FixedTokenizer:
  """Stands in for transformers' CLIPTokenizer (whose vocabulary would be downloaded): the same
  77 ids for every prompt (`fixed_token_ids`), in the dict form their encoder reads."""

  def __call__(self, text, max_length=77, **unused):
    import torch
    return {'input_ids': torch.tensor([fixed_token_ids(max_length)] * len(text))}


def _official_sd_net(official, device):
  """Their LatentDiffusion for SD v1.5 (random weights) in their classifier-free CFGPrecond."""
  import pytorch_lightning  # noqa: F401  (first: see _official_ldm_net)
  import transformers
  _stand_in('torchvision', always=True)
  _stand_in('torchvision.utils', always=True, make_grid=None)
  _stand_in('clip')  # their encoders module imports it for FrozenCLIPTextEmbedder, unused by SD v1
  _stand_in('kornia')  # ... and for FrozenClipImageEmbedder's preprocessing
  text_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act='quick_gelu')
  # No hub: the ViT-L/14 text tower with random weights, and the fixed-id tokenizer.
  transformers.CLIPTextModel.from_pretrained = classmethod(lambda cls, *a, **k: cls(text_config))
  transformers.CLIPTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: _FixedTokenizer())
  from omegaconf import OmegaConf
  from models.ldm.util import instantiate_from_config  # noqa: E402  (their code, by sys.path)
  from models.networks_edm import CFGPrecond  # noqa: E402
  config = OmegaConf.load(official / 'models/ldm/configs/stable-diffusion/v1-inference.yaml')
  config.model.params.cond_stage_config.params = {'device': str(device)}  # their default is 'cuda'
  net = CFGPrecond(instantiate_from_config(config.model), img_resolution=64, img_channels=4, guidance_rate=1.,
                   guidance_type='classifier-free', label_dim=True).to(device)
  net.sigma_min = 0.1
  return net


def official_worker(args):
  """Builds the official student/teacher and runs their training iteration on request."""
  import contextlib
  import torch
  official = pathlib.Path(args.official).absolute()
  if not (official / 'training' / 'loss.py').is_file():
    sys.exit(f'--official={args.official}: not an sfd-main checkout (no training/loss.py)')
  _stand_in('requests')

  class _NoLPIPS:  # second-stage only
    def __init__(self, *a, **k):
      raise NotImplementedError('piq.LPIPS stand-in: second-stage distillation is not benchmarked')
  _stand_in('piq', always=True, LPIPS=_NoLPIPS)  # importing piq pulls in torchvision, for nothing here
  sys.path.insert(0, str(official))
  from models.networks_edm import EDMPrecond  # noqa: E402  (their code, by sys.path)
  from training.loss import loss as SFDLoss  # noqa: E402
  from torch_utils import training_stats  # noqa: E402

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.manual_seed(0)
  torch.backends.cudnn.benchmark = True  # as their loop sets
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  # Their create_model('cifar10') network kwargs.
  sfd = settings_of(args.model)
  t_setup = time.perf_counter()
  if args.model in LATENT:
    net = (_official_ldm_net if args.model == 'lsun_bedroom_ldm' else _official_sd_net)(official, device)
    sfd['sigma_max'] = net.sigma_max
  else:
    net = EDMPrecond(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet',
                     embedding_type='positional', encoder_type='standard', decoder_type='standard',
                     channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                     dropout=0.13, use_fp16=False, augment_dim=9).to(device)
    net.sigma_min, net.sigma_max = sfd['sigma_min'], sfd['sigma_max']
  net.use_fp16 = args.official_fp16
  teacher = copy.deepcopy(net).eval()
  net.train().requires_grad_(True)
  latent = args.model in LATENT
  text = args.model == 'ms_coco'
  uc = None
  if text:  # their loop encodes "" once before training (used only at guidance != 1)
    with torch.no_grad():
      uc = net.model.get_learned_conditioning(args.batch * [''])
  # Their loop runs an LDM teacher inside its LitEma scope (EMA weights swapped in and back).
  teacher_scope = teacher.model.ema_scope if latent else contextlib.nullcontext
  loss_fn = SFDLoss(num_steps=sfd['num_steps'], sampler_tea=sfd['sampler_tea'], M=sfd['M'],
                    schedule_type=sfd['schedule_type'], schedule_rho=sfd['schedule_rho'], afs=sfd['afs'],
                    max_order=sfd['max_order'], sigma_min=sfd['sigma_min'], sigma_max=sfd['sigma_max'],
                    predict_x0=sfd['predict_x0'], lower_order_final=sfd['lower_order_final'],
                    use_step_condition=False, model_source='ldm' if latent else 'edm', is_second_stage=False)
  optimizer = torch.optim.Adam(net.parameters(), lr=LR, betas=[0.9, 0.999], eps=1e-8)
  batch = args.batch
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def iteration():
    latents = loss_fn.sigma_max * torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution],
                                              device=device)
    cond = {}
    if text:  # their loop: prompts drawn per round, encoded by the (frozen) text encoder
      with torch.no_grad():
        cond = dict(condition=net.model.get_learned_conditioning(['a prompt'] * batch), unconditional_condition=uc)
    with torch.no_grad(), teacher_scope():
      teacher_traj = loss_fn.get_teacher_traj(net=teacher, tensor_in=latents, labels=None, **cond)
    for step_idx in range(loss_fn.num_steps - 1):
      optimizer.zero_grad(set_to_none=True)
      loss, stu_out = loss_fn(net=net, tensor_in=latents, labels=None, step_idx=step_idx,
                              teacher_out=teacher_traj[step_idx], **cond)
      latents = stu_out
      training_stats.report('Loss/loss', loss)
      if not (loss_fn.afs and step_idx == 0):
        loss.sum().mul(1 / batch).backward()
      with torch.no_grad():
        loss_norm = torch.norm(loss, p=2, dim=(1, 2, 3))
        loss_norm.mean().item(), loss_norm.std().item()  # their per-step log line (a device sync)
      if not (loss_fn.afs and step_idx == 0):
        for param in net.parameters():
          if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
    sync()

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  build_s = time.perf_counter() - t_setup
  t0 = time.perf_counter()
  iteration()  # warm-up (cudnn autotuning on GPU)
  say(ready=True, impl='official', setup_s=0.0, build_s=build_s, first_s=time.perf_counter() - t0,
      params=sum(p.numel() for p in net.parameters()), device=str(device),
      threads=torch.get_num_threads(), torch=torch.__version__,
      dtype='float16' if args.official_fp16 and device.type == 'cuda' else 'float32')
  return iteration, lambda: (torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None)


# ------------------------------------------------------------------------------ sfd_jax

def jax_worker(args):
  """Builds the same network in sfd_jax and compiles its iteration (experiments/bench_sfd_step.py)."""
  sys.path.insert(0, str(ROOT / 'experiments'))
  sys.path.insert(0, str(ROOT))
  import inspect
  import jax
  import bench_sfd_step as bench
  from sfd_jax import networks
  models, cfg = bench.build_models(dict(bench.CIFAR10_DDPMPP))
  extra = {}
  if args.model in LATENT:
    return jax_ldm_worker(args)
  if args.jax_dtype != 'float32':
    if 'dtype' not in inspect.signature(bench.make_runner).parameters:  # older checkouts
      sys.exit(f'--jax_dtype={args.jax_dtype}: the training step of this checkout has no compute-dtype option '
               '(experiments/bench_sfd_step.make_runner takes no dtype)')
    extra['dtype'] = args.jax_dtype
  compile_s, run = bench.make_runner(models, cfg, args.batch, SFD['num_steps'], **extra)
  t0 = time.perf_counter()
  jax.block_until_ready(run(0))
  device = jax.devices()[0]
  say(ready=True, impl='sfd_jax', setup_s=compile_s, first_s=time.perf_counter() - t0,
      params=networks.count_params(models.student_variables), device=f'{device.device_kind} x{jax.device_count()}',
      jax=jax.__version__, dtype=args.jax_dtype)
  counter = [1]

  def iteration():
    jax.block_until_ready(run(counter[0]))
    counter[0] += 1

  def peak_device_gb():
    stats = device.memory_stats() or {}
    return stats['peak_bytes_in_use'] / 2**30 if 'peak_bytes_in_use' in stats else None
  return iteration, peak_device_gb


def jax_ldm_worker(args):
  """The LSUN-Bedroom LDM-4 (or SD v1.5) teacher and student in sfd_jax (random weights); compiles
  the step's programs first (`step.compile`, one thread: its time is the compile time reported),
  then runs the first iteration."""
  sys.path.insert(0, str(ROOT / 'experiments'))
  sys.path.insert(0, str(ROOT))
  import jax
  import numpy as np
  import latent_random
  from sfd_jax import conditions, sfd, train
  from sfd_jax.config_types import DistillSettings, OptimSettings, TrainSettings
  from sfd_jax.latent import student as latent_student
  t0 = time.perf_counter()
  teacher = latent_random.random_teacher(LATENT[args.model])
  config, vp = teacher.config, teacher.vp
  if args.model == 'ms_coco':  # prompts tokenised once; each batch drawn and encoded in the jitted draw
    token_ids = np.array([fixed_token_ids()] * max(args.batch, 16), np.int32)
    source = conditions.text_prompts(token_ids, teacher.encode_tokens, teacher.text_encoder_variables())
  else:
    source = conditions.unconditional()
  family = train.Family(shape=latent_student.latent_shape(config), condition=source,
                        network_meta={}, decode=None, vp=vp)
  variables = latent_student.student_variables(teacher.raw_params)
  models = train.Models(teacher.denoise, teacher.params, config, latent_student.make_student_denoise(config, vp),
                        variables, config, family)
  settings = DistillSettings(**dict(settings_of(args.model), sigma_max=teacher.sigma_max))
  optim = OptimSettings(lr=LR)
  optimizer = sfd.make_optimizer(optim)
  mesh = train.make_mesh()
  step = train.make_step(models, optimizer, train.step_options(TrainSettings(batch=args.batch), jax.device_count()),
                         mesh)
  draw = train.make_batch_fn(mesh, (args.batch, *family.shape), family.condition, settings.sigma_max)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Host copies: the student's arrays are the random teacher's own (no LitEma here), and on CPU
  # device_put aliases them, so donating the state would delete the teacher's weights (train.py).
  params, buffers = jax.device_put(jax.tree.map(np.array, sfd.split_variables(variables)), replicated)
  teacher_variables = jax.device_put(teacher.denoiser_variables(), replicated)  # as train.py
  del teacher, variables, models  # the device copies are what runs
  state = [sfd.TrainState(params, jax.jit(optimizer.init, out_shardings=replicated)(params), buffers)]
  build_s = time.perf_counter() - t0
  key = jax.random.key(0)
  latents, condition = draw(key)
  t0 = time.perf_counter()
  done = step.compile(state[0], teacher_variables, latents, condition, key, optim.lr, settings, workers=1)
  compile_s = time.perf_counter() - t0
  counter = [0]

  def iteration():
    i = counter[0]
    latents, condition = draw(jax.random.fold_in(key, i))
    state[0], metrics = step(state[0], teacher_variables, latents, condition, jax.random.fold_in(key, 10_000 + i),
                             np.float32(optim.lr), settings)
    jax.block_until_ready(metrics)
    counter[0] += 1

  t0 = time.perf_counter()
  iteration()
  device = jax.devices()[0]
  say(ready=True, impl='sfd_jax', setup_s=compile_s, build_s=build_s, first_s=time.perf_counter() - t0,
      programs={k: round(v, 1) for k, v in done.items()},
      params=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), device=f'{device.device_kind} x{jax.device_count()}',
      jax=jax.__version__, dtype=args.jax_dtype)
  return iteration, lambda: None


def worker_main(args):
  """Sets up, then times one iteration per 'run' line on stdin until 'quit'."""
  iteration, peak_device_gb = (official_worker if args.worker == 'official' else jax_worker)(args)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    t0 = time.perf_counter()
    iteration()
    say(seconds=time.perf_counter() - t0, peak_rss_gb=peak_rss_gb(), peak_device_gb=peak_device_gb())


# ------------------------------------------------------------------------------- driver

class Worker:
  """A worker subprocess speaking the TAG protocol."""

  def __init__(self, impl, args):
    python = args.official_python if impl == 'official' and args.official_python else sys.executable
    cmd = [python, __file__, f'--worker={impl}', f'--batch={args.batch}', f'--official={args.official}',
           f'--official_fp16={args.official_fp16}', f'--jax_dtype={args.jax_dtype}', f'--model={args.model}']
    self.impl = impl
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    self.t0 = time.perf_counter()

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(TAG):
        return json.loads(line[len(TAG):])
    raise RuntimeError(f'{self.impl} worker exited with code {self.proc.wait()} (see its stderr above)')

  def ready(self) -> dict:
    info = self.read()
    info['wall_setup_s'] = time.perf_counter() - self.t0
    return info

  def run(self) -> dict:
    self.proc.stdin.write('run\n')
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write('quit\n')
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


def median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def driver(args):
  impls = [i for i in ('official', 'sfd_jax') if i in args.only.split(',')]
  workers = {}
  results = dict(model=args.model, sequential=args.sequential, batch=args.batch, machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                 date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), load_before=os.getloadavg(),
                 rounds=args.rounds, impls={})
  def start(impl):
    workers[impl] = Worker(impl, args)
    info = workers[impl].ready()
    results['impls'][impl] = dict(info, seconds=[])
    print(f'{impl}: ready after {info["wall_setup_s"]:.1f} s (compile {info["setup_s"]:.1f} s, first iteration '
          f'{info["first_s"]:.1f} s); {info["params"]:,} params on {info["device"]}, {info["dtype"]}', flush=True)

  def run(impl, r):
    out = workers[impl].run()
    results['impls'][impl]['seconds'].append(out['seconds'])
    results['impls'][impl].update(peak_rss_gb=out['peak_rss_gb'], peak_device_gb=out['peak_device_gb'])
    print(f'round {r}: {impl:8s} {out["seconds"]:8.2f} s/iteration  ({out["seconds"] / args.batch * 1000:8.1f} '
          f's/kimg)  peak RSS {out["peak_rss_gb"]:.2f} GB  load {os.getloadavg()[0]:.1f}', flush=True)

  try:
    if args.sequential:  # one worker alive at a time: the two never hold their memory together
      for impl in impls:
        start(impl)
        for r in range(args.rounds):
          run(impl, r)
        workers.pop(impl).close()
    else:
      for impl in impls:  # set up one at a time: compiling and warming up do not overlap
        start(impl)
      for r in range(args.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate which goes first
          run(impl, r)
  finally:
    for w in workers.values():
      w.close()
  results['load_after'] = os.getloadavg()
  for impl, r in results['impls'].items():
    r['median_s'] = median(r['seconds'])
    r['s_per_kimg'] = r['median_s'] / args.batch * 1000
    if args.model == 'cifar10':  # --tflop_per_kimg counts the CIFAR-10 network's FLOPs
      r['tflops'] = args.tflop_per_kimg / r['s_per_kimg']  # achieved, counting the model's own FLOPs
      if args.peak_tflops:
        r['mfu'] = r['tflops'] / args.peak_tflops
    mem = f'peak RSS {r["peak_rss_gb"]:.2f} GB' + (
        f', peak device memory {r["peak_device_gb"]:.2f} GB' if r.get('peak_device_gb') else '')
    flops = '' if args.model != 'cifar10' else f'; {r["tflops"]:.2f} TFLOP/s' + (
        f' = MFU {r["mfu"]:.1%} of {args.peak_tflops:g}' if args.peak_tflops else '')
    print(f'{impl:8s}: median {r["median_s"]:.2f} s/iteration = {r["s_per_kimg"]:.1f} s/kimg '
          f'(compile {r["setup_s"]:.1f} s, first {r["first_s"]:.1f} s); {mem}{flops}')
  if len(results['impls']) == 2:
    o, j = results['impls']['official'], results['impls']['sfd_jax']
    pair = [a / b for a, b in zip(o['seconds'], j['seconds'])]
    results['speed_ratio'] = o['median_s'] / j['median_s']
    results['speed_ratio_per_round'] = pair
    print(f'speed sfd_jax / official: {results["speed_ratio"]:.2f}x (per round: '
          f'{", ".join(f"{p:.2f}" for p in pair)}; > 1 means sfd_jax is faster)')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official', required=True, help='path of an sfd-main checkout (zju-pi/diff-sampler)')
  parser.add_argument('--model', default='cifar10', choices=MODELS,
                      help='cifar10: EDM DDPM++ (SongUNet); lsun_bedroom_ldm: the LDM-4 teacher (latent)')
  parser.add_argument('--official_python', default='',
                      help='interpreter of the environment with the official code\'s dependencies (default: this one)')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=3, help='timed iterations per implementation, alternating')
  parser.add_argument('--only', default='official,sfd_jax', help='comma list: official, sfd_jax')
  parser.add_argument('--sequential', action='store_true',
                      help='set up, time and close one implementation, then the other (when both will not fit '
                           'in memory together; the ratio then spans two time windows)')
  parser.add_argument('--official_fp16', type=lambda s: s.lower() in ('1', 'true'), default=True,
                      help="the official loop's net.use_fp16 (takes effect on CUDA only)")
  parser.add_argument('--jax_dtype', default='float32', help="sfd_jax's compute dtype (float32, bfloat16)")
  parser.add_argument('--tflop_per_kimg', type=float, default=763.0,
                      help='model FLOPs of 1000 distilled trajectories: 18 forward-equivalents x 42.4 GFLOP '
                           '(CIFAR-10 DDPM++: 12 teacher forwards + 2 student forward/backward at 3x)')
  parser.add_argument('--peak_tflops', type=float, default=0.0, help='device peak for the MFU figure (0: none)')
  parser.add_argument('--json', default='', help='also write the results to this JSON file')
  parser.add_argument('--worker', choices=('official', 'sfd_jax'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args)
  else:
    if not (pathlib.Path(args.official) / 'training' / 'loss.py').is_file():
      sys.exit(f'--official={args.official}: not an sfd-main checkout (no training/loss.py)')
    driver(args)


if __name__ == '__main__':
  main()
