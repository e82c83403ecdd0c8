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
