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


def test_count_every_chunk_counts_the_chunked_attention_as_the_dense_one():
  """XLA counts a lax.map body once: 2048 queries in chunks of 1024 report half the dense FLOPs,
  and `latent_random.count_every_chunk` (the benchmarks' FLOP counts) restores them, with the same
  values."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import latent_random
  from sfd_jax.latent import layers

  def count(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])

  q, k, v = (jax.random.normal(jax.random.key(i), (1, 2048, 2, 16)) for i in range(3))
  chunked = lambda q, k, v: layers.attention(q, k, v, 1.0, 0.25, chunk=1024)
  dense = lambda q, k, v: layers.attention(q, k, v, 1.0, 0.25, chunk=0)
  with latent_random.count_every_chunk():
    unrolled = count(lambda q, k, v: chunked(q, k, v), q, k, v)
    np.testing.assert_allclose(jax.jit(lambda q, k, v: chunked(q, k, v))(q, k, v), dense(q, k, v), rtol=1e-5,
                               atol=1e-6)
  assert jax.lax.map is not None and 'unrolled' not in jax.lax.map.__name__  # restored on exit
  assert count(chunked, q, k, v) < 0.6 * count(dense, q, k, v)
  np.testing.assert_allclose(unrolled, count(dense, q, k, v), rtol=0.02)
  assert jnp.shape(chunked(q, k, v)) == (1, 2048, 2, 16)
