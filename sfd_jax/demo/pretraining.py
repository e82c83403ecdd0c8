"""Trains the small EDM teacher of the embedded demo on scikit-learn's digits.

    python -m sfd_jax.demo.pretrain --config=configs/demo_teacher.py --workdir=DIR

EDM's training recipe (Karras et al. 2022): log-normal noise levels, the loss weight
(σ² + σ_d²) / (σ σ_d)², EDMPrecond, Adam with a linear learning-rate ramp-up, and an
exponential moving average of the weights whose half-life is counted in images. Data
augmentation is off. The EMA weights are written with `io.save_converted`, so
`sfd_jax.load_teacher(DIR/teacher)` reads them.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax.demo import data
from sfd_jax import networks
from sfd_jax import io


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
  """The training values of `configs/demo_teacher.py`, typed (see that file for meanings)."""
  seed: int
  resolution: int
  batch_size: int
  num_steps: int
  lr: float
  lr_rampup_kimg: float
  ema_halflife_kimg: float
  ema_rampup_ratio: float
  p_mean: float
  p_std: float
  sigma_data: float
  log_every: int
  save_every: int

  @classmethod
  def from_config(cls, config):
    """Reads the fields from the ConfigDict of `configs/demo_teacher.py`."""
    train, loss = config.train, config.loss
    return cls(seed=config.seed, resolution=config.data.resolution, batch_size=train.batch_size,
               num_steps=train.num_steps, lr=train.lr, lr_rampup_kimg=train.lr_rampup_kimg,
               ema_halflife_kimg=train.ema_halflife_kimg, ema_rampup_ratio=train.ema_rampup_ratio,
               p_mean=loss.P_mean, p_std=loss.P_std, sigma_data=loss.sigma_data,
               log_every=train.log_every, save_every=train.save_every)


def network_config(config):
  """`NetworkConfig` of the teacher from the config's `network` block (EDM kwargs)."""
  kwargs = dict(config.network.to_dict())
  precond = kwargs.pop('precond')
  kwargs.update(img_resolution=config.data.resolution, img_channels=1, label_dim=0)
  return networks.NetworkConfig.from_edm(precond, kwargs)


def edm_loss(denoise, params, buffers, images, key, *, p_mean, p_std, sigma_data):
  """EDM's denoising loss, summed over pixels and averaged over the batch.

  Args:
    denoise: `make_denoise(config)` of an EDMPrecond network.
    params, buffers: network variables (only `params` is differentiated).
    images: clean images `[N, H, W, C]` in [-1, 1].
    key: PRNG key for the noise levels, the noise and dropout.
    p_mean, p_std: ln σ ~ N(p_mean, p_std²).
    sigma_data: σ_d of the loss weight (σ² + σ_d²) / (σ σ_d)².

  Returns:
    Scalar loss.
  """
  key_sigma, key_noise, key_dropout = jax.random.split(key, 3)
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(key_sigma, (images.shape[0],)))
  weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
  noisy = images + sigma[:, None, None, None] * jax.random.normal(key_noise, images.shape)
  denoised = denoise({'params': params, 'buffers': buffers}, noisy, sigma,
                     train=True, dropout_rng=key_dropout)
  per_image = jnp.sum((denoised - images) ** 2, axis=(1, 2, 3))
  return jnp.mean(weight * per_image)


def ema_beta(step, settings):
  """EDM's EMA decay after `step` updates: half-life in images, ramped up with images seen."""
  nimg = (step + 1) * settings.batch_size
  halflife = jnp.minimum(settings.ema_halflife_kimg * 1000.0, nimg * settings.ema_rampup_ratio)
  return 0.5 ** (settings.batch_size / jnp.maximum(halflife, 1e-8))


def make_optimizer(settings):
  """Adam (EDM's betas and eps) with the learning rate ramped up linearly over images seen."""
  rampup_steps = settings.lr_rampup_kimg * 1000.0 / settings.batch_size

  def schedule(count):
    return settings.lr * jnp.minimum((count + 1) / max(rampup_steps, 1e-8), 1.0)

  return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)


def init_state(net_config, optimizer, key):
  """Fresh training state: params, EMA params, optimizer state, buffers and step."""
  variables = networks.init_variables(net_config, key)
  params = variables['params']
  return dict(params=params, ema=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
              buffers=variables['buffers'], step=jnp.zeros((), jnp.int32))


def make_train_step(denoise, optimizer, dataset, settings):
  """Builds the jitted step `(state, key) -> (state, metrics)`.

  The whole data set (a few hundred kB) is a constant of the step; each step draws its
  batch indices from `key`, so the run is determined by the seed alone.
  """
  dataset = jnp.asarray(dataset)

  def loss_fn(params, buffers, key):
    key_batch, key_loss = jax.random.split(key)
    idx = jax.random.randint(key_batch, (settings.batch_size,), 0, dataset.shape[0])
    return edm_loss(denoise, params, buffers, dataset[idx], key_loss, p_mean=settings.p_mean,
                    p_std=settings.p_std, sigma_data=settings.sigma_data)

  def step_fn(state, key):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], state['buffers'], key)
    # Same guard as EDM's loop: one bad batch must not poison the weights.
    grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    beta = ema_beta(state['step'], settings)
    ema = jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, state['ema'], params)
    new_state = dict(params=params, ema=ema, opt_state=opt_state, buffers=state['buffers'],
                     step=state['step'] + 1)
    return new_state, dict(loss=loss)

  return jax.jit(step_fn, donate_argnums=0)


def save_teacher(path, net_config, state):
  """Writes the EMA weights as a converted teacher directory."""
  variables = {'params': jax.device_get(state['ema']), 'buffers': jax.device_get(state['buffers'])}
  io.save_converted(path, net_config, variables)


def pretrain(config, workdir):
  """Runs the teacher training and writes `workdir/teacher` (EMA weights) and `workdir/log.jsonl`.

  Args:
    config: the ConfigDict of `configs/demo_teacher.py`.
    workdir: output folder (created if needed).

  Returns:
    Path of the converted teacher directory.
  """
  settings = PretrainSettings.from_config(config)
  net_config = network_config(config)
  images, _ = data.load_digits_images(settings.resolution)
  optimizer = make_optimizer(settings)
  key = jax.random.key(settings.seed)
  state = init_state(net_config, optimizer, jax.random.fold_in(key, 0))
  step_fn = make_train_step(networks.make_denoise(net_config), optimizer, images, settings)
  train_key = jax.random.fold_in(key, 1)
  os.makedirs(workdir, exist_ok=True)
  teacher_path = os.path.join(workdir, 'teacher')
  print(f'teacher: {networks.count_params(state):,} params, {settings.num_steps} steps '
        f'of batch {settings.batch_size}', flush=True)
  start, losses = time.time(), []
  with open(os.path.join(workdir, 'log.jsonl'), 'a') as log:
    for step in range(settings.num_steps):
      state, metrics = step_fn(state, jax.random.fold_in(train_key, step))
      losses.append(metrics['loss'])
      done = step + 1
      if done % settings.log_every == 0 or done == settings.num_steps:
        record = dict(step=done, loss=float(np.mean(jax.device_get(losses))),
                      seconds=round(time.time() - start, 1))
        losses = []
        log.write(json.dumps(record) + '\n')
        log.flush()
        print(json.dumps(record), flush=True)
      if done % settings.save_every == 0 and done != settings.num_steps:
        save_teacher(os.path.join(workdir, f'teacher-{done:07d}'), net_config, state)
  save_teacher(teacher_path, net_config, state)
  print(f'wrote {teacher_path} after {time.time() - start:.0f} s', flush=True)
  return teacher_path
