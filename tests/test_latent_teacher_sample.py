"""Sampling a latent teacher itself: `python -m sfd_jax.sample --network=model.ckpt --arch=...` on
the tiny LDM fixture (tests/fixtures/ldm/ldm_bedroom_tiny.*: 16x16x3 latents, VQ-f4 first stage,
64x64 images).

The reference is a second path built from the teacher's public interface alone (`denoise`,
`decode`, `vp`, `sigma_min` / `sigma_max`, proven against the official code in
test_latent_networks.py and test_latent_precond.py) with the solvers and the schedule called
directly, at the same batch: the same float32 arithmetic, so the uint8 images are equal.
"""
import numpy as np
import pytest

from conftest import FIXTURES
from sfd_jax import images, sample, sampling, schedules, solvers
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"
CKPT, YAML = LDM / "ldm_bedroom_tiny.ckpt", LDM / "ldm_bedroom_tiny.yaml"
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def teacher():
  return load_teacher(CKPT, arch=YAML)


def reference(teacher, num_steps, solver, afs, schedule_type="discrete", rho=1.0):
  """uint8 images of SEEDS: the teacher's CFGPrecond over its schedule, decoded by its first stage."""
  t_steps = schedules.get_schedule(num_steps, teacher.sigma_min, teacher.sigma_max, schedule_type, rho, vp=teacher.vp)
  options = {} if solver == "euler" else dict(max_order=None, predict_x0=True, lower_order_final=True,
                                              thresholding=True)
  out = sampling.generate(lambda v, x, s, c: teacher.denoise(v, x, s), (16, 16, 3), SEEDS, t_steps=t_steps,
                          solver=solver, afs=afs, variables=teacher.params, batch_size=4, decode_fn=teacher.decode,
                          **options)
  return images.to_uint8(out)


def run_sample(tmp_path, capsys, *flags):
  out = tmp_path / "s.npz"
  assert sample.main(["--network", str(CKPT), "--arch", str(YAML), "--seeds", "0-2", "--batch", "4",
                      "--npz", str(out), "--noprogress", *flags]) == 0
  return np.load(out)["arr_0"], capsys.readouterr().out


def test_defaults_are_dpm_solver_pp_on_the_discrete_schedule(teacher, tmp_path, capsys):
  """No solver flags: DPM-Solver++ with 10 NFE over the discrete schedule (rho 1) from sigma(1) to
  the official LDM sigma_min 0.006, decoded to 64x64 images."""
  defaults = sampling.LATENT_TEACHER_DEFAULTS
  assert (defaults.solver, defaults.num_steps, defaults.schedule_type, defaults.schedule_rho) == (
      "dpmpp", 11, "discrete", 1.0)
  model = sampling.load_model(network=str(CKPT), arch=str(YAML))
  assert (model.settings.sigma_min, model.settings.sigma_max) == (0.006, teacher.sigma_max) and model.nfe == 10
  got, out = run_sample(tmp_path, capsys)
  assert got.shape == (3, 64, 64, 3) and out.strip().endswith("NFE 10"), out
  want = reference(teacher, 11, "dpmpp", afs=False)
  np.testing.assert_array_equal(got, want)
  # What the comparison tells apart: the same solver on EDM's polynomial schedule.
  assert np.mean(want != reference(teacher, 11, "dpmpp", afs=False, schedule_type="polynomial", rho=7.0)) > 0.1


def test_solver_flags_apply_to_a_latent_teacher(teacher, tmp_path, capsys):
  got, out = run_sample(tmp_path, capsys, "--solver=euler", "--num_steps=4", "--afs")
  assert out.strip().endswith("NFE 2"), out
  np.testing.assert_array_equal(got, reference(teacher, 4, "euler", afs=True))
  got, out = run_sample(tmp_path, capsys, "--solver=heun", "--num_steps=3", "--schedule=polynomial", "--rho=7",
                      "--sigma_max=500")  # clamped to the teacher's sigma(1)
  np.testing.assert_array_equal(got, reference(teacher, 3, "heun", afs=False, schedule_type="polynomial", rho=7.0))
  assert out.strip().endswith(f"NFE {solvers.nfe('heun', 3, False)}"), out


@pytest.mark.parametrize("flags, message", [
    (["--rho=7"], "--rho: the discrete schedule needs rho = 1"),
    (["--schedule=nope"], "--schedule: unknown schedule 'nope'"),
    (["--guidance=7.5"], "--guidance: the model is not text-conditioned"),
    (["--prompt=a cat"], "--prompts / --prompt: the model is not text-conditioned"),
])
def test_errors_are_one_line(flags, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    sample.main(["--network", str(CKPT), "--arch", str(YAML), "--grid", str(tmp_path / "g.png"), "--noprogress",
                 *flags])
  err = capsys.readouterr().err
  assert info.value.code == 2 and message in err and err.count("\n") == 1, err
  assert not (tmp_path / "g.png").exists()


def test_arch_errors_name_the_flag_or_file(tmp_path, capsys):
  cases = [
      (["--network", str(CKPT)], "ldm_bedroom_tiny.ckpt: an LDM / SD checkpoint needs arch"),
      (["--student", str(tmp_path), "--arch", "sd-v1"], "--arch: a student names its own architecture"),
      (["--network", str(CKPT), "--arch", "sd-v9"], "sd-v9"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit) as info:
      sample.main(argv + ["--grid", str(tmp_path / "g.png"), "--noprogress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_a_teacher_with_lit_ema_samples_with_the_shadows(tmp_path):
  """A released LDM checkpoint carries LitEma shadows: `--network` samples with them (the official
  teacher runs inside `ema_scope()`), not with the raw weights a student starts from."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from sfd_jax.io.ldm_checkpoint import read_checkpoint  # pylint: disable=g-import-not-at-top
  from sfd_jax.latent.state_dict import ema_name, flatten  # pylint: disable=g-import-not-at-top
  state_dict = {k: np.ascontiguousarray(v) for k, v in read_checkpoint(CKPT).items()}
  unet = [k for k in state_dict if k.startswith("model.diffusion_model.")]
  shadows = {ema_name(k): state_dict[k] * np.float32(0.5) for k in unet}
  meta = {"model_ema.decay": np.asarray(0.9999, np.float32), "model_ema.num_updates": np.asarray(7, np.int32)}
  path = tmp_path / "ema.safetensors"
  save_file({**state_dict, **shadows, **meta}, str(path))
  model = sampling.load_model(network=str(path), arch=str(YAML))
  sampled = flatten({**model.variables["params"], **model.variables["buffers"]})
  for name in unet:
    np.testing.assert_array_equal(sampled[name], state_dict[name] * np.float32(0.5))
  name = "first_stage_model.post_quant_conv.weight"
  np.testing.assert_array_equal(sampled[name], state_dict[name])
