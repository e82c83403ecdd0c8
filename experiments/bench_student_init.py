"""Times building the SFD-v student from a CIFAR-10-size teacher's state dict: initialising the
whole network (what `state_dict_to_variables` did before) against initialising only the missing
step-condition layers (`networks.state_dict.init_named`, what it does now). Fresh process, no
compilation cache, so both include compiling.

  python experiments/bench_student_init.py [--small]
"""
import argparse
import time

import jax

from sfd_jax import networks, train
from sfd_jax.networks.state_dict import init_named

from bench_sfd_step import CIFAR10_DDPMPP, SMALL


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true')
  args = parser.parse_args()
  teacher_config = networks.NetworkConfig.from_edm('VPPrecond', SMALL if args.small else CIFAR10_DDPMPP)
  student_config = train.student_config_for(teacher_config, dropout=-1.0)
  missing = [n for n in networks.expected_shapes(student_config) if networks.is_step_condition_name(n)]
  jax.block_until_ready(jax.numpy.zeros(1))
  start = time.perf_counter()
  named = jax.block_until_ready(init_named(student_config, jax.random.key(1), missing))
  t_named = time.perf_counter() - start
  start = time.perf_counter()
  full = jax.block_until_ready(networks.init_variables(student_config, jax.random.key(1)))
  t_full = time.perf_counter() - start
  flat = networks.variables_to_state_dict(full)
  equal = all(bool((named[n] == flat[n]).all()) for n in missing)
  print(f'{len(missing)} step-condition arrays of {len(flat)}: init_named {t_named:.1f} s, '
        f'whole network {t_full:.1f} s, bit-equal: {equal}')


if __name__ == '__main__':
  main()
