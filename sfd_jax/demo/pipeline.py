"""The whole demo as one call: distil the shipped digits teacher, then evaluate and report."""
import time

from sfd_jax import checkpoint, teacher, train
from sfd_jax.demo import report


def run(config, workdir, options: report.EvalOptions = report.DEFAULT_OPTIONS) -> dict:
  """Distils (or resumes) with `config` (a ConfigDict, e.g. `demo.config.distill_config()`),
  then writes report.md, report.json and grid.png to `workdir`; returns the report."""
  start = time.time()
  train.run(config, workdir)
  timings = dict(distill=round(time.time() - start, 1))
  return report.make_report(workdir, teacher.load_teacher(config.teacher), checkpoint.load_student(workdir),
                            options, timings)
