"""Micro-batches and several devices with a latent teacher: one SFD iteration of the tiny LDM
fixture teacher (16x16x3 latents, DPM-Solver++(3M) with dynamic thresholding, discrete schedule,
AFS) on a batch of 8, split into micro-batches (`train.batch_per_device`) and sharded over 2 and
8 fake CPU devices, equals the unsplit single-device iteration, which tests/test_latent_sfd_step.py
checks against the official code.

The splits only reorder float32 sums, so the tolerances are the official iteration's own
fp32-vs-fp64 gaps (fixture README, `sfd_iter_ldm.json`), twice, as tests/test_step_options.py
does for EDM; Adam runs with eps 1 so that later intervals differ only as much as the gradients
do (see LIPSCHITZ_OPTIM there). Measured (CPU, 2026-12-07): largest relative gradient difference
1.9e-6 / 2.4e-6 (4 micro-batches), 2.1e-6 / 3.4e-6 (2 devices x 2), 2.1e-6 / 2.6e-6 (8 devices)
for steps 1 / 2, against 2.7e-5.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import FIXTURES
from sfd_jax import sfd, train
from sfd_jax.config_types import DistillSettings, OptimSettings, TrainSettings
from sfd_jax.latent.state_dict import flatten
from sfd_jax.latent.student import make_student_denoise, student_variables
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"
GAPS = json.loads((LDM / "sfd_iter_ldm.json").read_text())
FP = GAPS["fp32_vs_fp64"]
OUT_TOL = [2 * g["max_abs"] for g in FP["student_out"]]
LOSS_RTOL = 2 * FP["loss_sum"]["max_rel_to_max"]
GRAD_REL_TOL = 2 * max(g["max_rel_gap"] for g in FP["grads"][1:])
DEAD = set(GAPS["structural_zero_gradient"]["dead_tensors"])
KEY_BIAS = GAPS["structural_zero_gradient"]["key_bias_slices"]
BATCH = 8
LIPSCHITZ_OPTIM = dataclasses.replace(OptimSettings(), eps=1.0)


@pytest.fixture(scope="module")
def teacher():
  return load_teacher(LDM / "ldm_bedroom_tiny.ckpt", arch=LDM / "ldm_bedroom_tiny.yaml")


@pytest.fixture(scope="module")
def models(teacher):
  return train.Models(teacher.denoise, teacher.params, teacher.config,
                      make_student_denoise(teacher.config, teacher.vp), student_variables(teacher.raw_params),
                      teacher.config)


@pytest.fixture(scope="module")
def settings(teacher):
  return DistillSettings(num_steps=4, M=3, sampler_tea="dpmpp", max_order=3, predict_x0=True, lower_order_final=True,
                         thresholding=True, schedule_type="discrete", schedule_rho=1.0, afs=True, sigma_min=0.006,
                         sigma_max=teacher.sigma_max)


def one_iteration(models, teacher, settings, opts, num_devices=1):
  """One debug iteration on a fixed batch of 8 latents; host (params, metrics, debug)."""
  optimizer = sfd.make_optimizer(LIPSCHITZ_OPTIM)
  params, buffers = sfd.split_variables(models.student_variables)
  # Copies: the step donates its state, the module-scoped variables must survive.
  state = jax.tree.map(jnp.array, sfd.TrainState(params, optimizer.init(params), buffers))
  latents = settings.sigma_max * jax.random.normal(jax.random.key(11), (BATCH, 16, 16, 3))
  mesh = None
  if num_devices > 1:
    mesh = Mesh(np.array(jax.devices()[:num_devices]), (train.DATA_AXIS,))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    latents = jax.device_put(latents, NamedSharding(mesh, P(train.DATA_AXIS)))
  step = sfd.make_step(train.make_denoisers(models, "float32"), optimizer, opts, mesh=mesh, vp=teacher.vp, debug=True)
  state, metrics = step(state, models.teacher_variables, latents, None, jax.random.key(5), LIPSCHITZ_OPTIM.lr,
                        settings)
  debug = metrics.pop("debug")
  return jax.device_get((state.params, metrics, debug))


@pytest.fixture(scope="module")
def reference(models, teacher, settings):
  return one_iteration(models, teacher, settings, sfd.StepOptions())


def max_rel_grad_diff(grads, ref):
  """max over UNet tensors of max|a - b| / max|b|, the structural zeros (fixture JSON) left out:
  their gradient is rounding noise."""
  worst = 0.0
  ours = flatten(grads["model"]["diffusion_model"])
  for name, b in flatten(ref["model"]["diffusion_model"]).items():
    full = "model.diffusion_model." + name
    if full in DEAD:
      continue
    a, b = np.asarray(ours[name]).reshape(-1), np.asarray(b).reshape(-1)
    keep = np.ones(b.size, bool)
    keep[KEY_BIAS.get(full, [])] = False
    scale = np.abs(b[keep]).max()
    if scale > 0:
      worst = max(worst, float(np.abs(a - b)[keep].max() / scale))
  return worst


@pytest.mark.parametrize("batch_per_device, num_devices", [(2, 1), (2, 2), (1, 8)])
def test_split_iteration_equals_unsplit(models, teacher, settings, reference, batch_per_device, num_devices):
  """batch_per_device 2 on 1 device (4 micro-batches), on 2 devices (2 x 2), and 8 devices with 1
  row each: teacher targets, student outputs, losses and gradients as the unsplit iteration."""
  opts = train.step_options(TrainSettings(batch=BATCH, batch_per_device=batch_per_device), num_devices)
  assert opts.micro_batches == BATCH // num_devices // batch_per_device
  params, m, debug = one_iteration(models, teacher, settings, opts, num_devices)
  ref_params, ref, ref_debug = reference
  for target, ref_target in zip(debug["targets"], ref_debug["targets"]):
    np.testing.assert_allclose(target, ref_target, rtol=0, atol=2 * FP["teacher_targets"]["max_abs"])
  for i in range(3):
    np.testing.assert_allclose(debug["out"][i], ref_debug["out"][i], rtol=0, atol=OUT_TOL[i], err_msg=f"step {i}")
  np.testing.assert_allclose(m["loss"], ref["loss"], rtol=LOSS_RTOL)
  assert len(debug["grads"]) == 2
  for s, (g, g_ref) in enumerate(zip(debug["grads"], ref_debug["grads"]), start=1):
    rel = max_rel_grad_diff(g, g_ref)
    print(f"batch_per_device={batch_per_device}, {num_devices} device(s), step {s}: max relative gradient "
          f"difference {rel:.2e}")
    assert rel <= GRAD_REL_TOL, rel
  # Params after the two eps-1 Adam steps: each update moves by at most lr * |Δg| per step (lr *
  # 3 |Δg| bounds the second, whose moments mix both gradients), plus the rounding of p + update.
  grad_scale = jax.tree.map(lambda *g: max(np.abs(x).max() for x in g), *ref_debug["grads"])
  flat_scale = flatten(grad_scale["model"]["diffusion_model"])
  ours = flatten(params["model"]["diffusion_model"])
  for name, want in flatten(ref_params["model"]["diffusion_model"]).items():
    full = "model.diffusion_model." + name
    if full in DEAD or full in KEY_BIAS:  # rounding-noise gradients (their moves are lr * noise)
      continue
    atol = 4 * LIPSCHITZ_OPTIM.lr * GRAD_REL_TOL * flat_scale[name]
    np.testing.assert_allclose(ours[name], want, rtol=2 * np.finfo(np.float32).eps, atol=atol, err_msg=name)
  # The split is really different: not bit-identical to the unsplit run.
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(debug["grads"]), jax.tree.leaves(ref_debug["grads"])))
