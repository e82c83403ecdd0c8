"""The benchmark scripts' set-up (experiments/), without running their timed parts.

experiments/ is not a package: the scripts import each other by path, as they do when run.
"""
import pathlib
import sys

from sfd_jax import networks, sfd, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
import bench_sfd_step as bench  # noqa: E402


def test_bench_models_build_the_bfloat16_denoisers():
  # gpu_bench.sh's bf16 stage goes through bench_sfd_step.build_models; the low-precision
  # networks need both configs (a missing teacher config once crashed that stage).
  models, cfg = bench.build_models(dict(bench.SMALL))
  assert models.teacher_config is cfg and models.student_config is not None
  assert networks.count_params(models.student_variables) > networks.count_params(models.teacher_variables)
  denoisers = train.make_denoisers(models, 'bfloat16')
  assert isinstance(denoisers, sfd.Denoisers)
  assert denoisers.student_low is not None and denoisers.teacher_low is not None


def test_latent_random_teacher_has_the_checkpoints_ddpm_table():
  """experiments/latent_random.py (the latent benchmarks' random teacher): every parameter of the
  architecture, and LDM's linear DDPM table equal to the one the official code stored in the tiny
  fixture checkpoint (same linear_start / linear_end)."""
  import numpy as np
  import latent_random
  from conftest import FIXTURES
  from sfd_jax.io.ldm_checkpoint import read_checkpoint
  ldm = FIXTURES / 'ldm'
  teacher = latent_random.random_teacher(ldm / 'ldm_bedroom_tiny.yaml')
  stored = np.asarray(read_checkpoint(ldm / 'ldm_bedroom_tiny.ckpt')['alphas_cumprod'])
  np.testing.assert_allclose(teacher.raw_params['buffers']['alphas_cumprod'], stored, rtol=1e-6)
  np.testing.assert_allclose(teacher.sigma_max, 83.82248688, rtol=1e-6)  # the fixture README's sigma(1)
  z = np.ones((1, 16, 16, 3), np.float32)
  assert np.isfinite(np.asarray(teacher.denoise(teacher.params, z, 1.0))).all()
