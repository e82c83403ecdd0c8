"""One command-line style for every entry point: absl flags, `--help`, one-line errors.

Each entry point defines its flags on its own `FlagValues` (so that several can live in one
process, e.g. under pytest or in a notebook), parses with `parse`, and runs its body with
`run`, which turns the user's mistakes (bad flag values, missing or refused files) into one
line `PROG: error: MESSAGE` on stderr and exit status 2, with no traceback.
"""
import sys
from typing import Callable, NoReturn, Sequence

from absl import flags

# The exceptions that mean "bad input", reported as one line; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, NotImplementedError)


def new_flags() -> flags.FlagValues:
  """A private flag registry for one entry point."""
  return flags.FlagValues()


def fail(prog: str, message) -> NoReturn:
  """Prints `PROG: error: MESSAGE` (one line) and exits with status 2."""
  text = ' '.join(str(message).split())
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # a KeyError's repr
    text = text[1:-1]
  print(f'{prog}: error: {text}', file=sys.stderr)
  sys.exit(2)


def _describe(flag) -> str:
  default = repr(flag.default) if isinstance(flag.default, str) else flag.default
  prefix = f'--[no]{flag.name}' if flag.boolean else f'--{flag.name}'
  return f'  {prefix}: {flag.help} (default: {default})'


def parse(prog: str, doc: str, fv: flags.FlagValues, argv: Sequence[str]) -> list:
  """Parses `argv` (without the program name) into `fv`; returns the positional arguments.

  `--help` prints the docstring and every flag with its default, then exits 0; an unknown
  flag or a bad value exits 2 with one line.
  """
  argv = list(argv)
  if any(a in ('-h', '--help', '--helpfull', '-?') for a in argv):
    print('\n'.join([doc.strip(), '', f'flags of {prog}:'] +
                    [_describe(fv[name]) for name in sorted(_own_flags(fv))]))
    sys.exit(0)
  try:
    return fv([prog, *argv])[1:]
  except flags.Error as e:
    fail(prog, e)


def _own_flags(fv: flags.FlagValues):
  return {flag.name for module_flags in fv.flags_by_module_dict().values() for flag in module_flags}


def check_config_overrides(prog: str, argv: Sequence[str]) -> None:
  """An unknown `--config.KEY=...` fails with one line and a suggestion, before anything loads."""
  from sfd_jax import config_types  # pylint: disable=g-import-not-at-top
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      if not config_types.is_config_key(path):
        fail(prog, config_types.unknown_key_message(path))


def run(prog: str, body: Callable[[], None]) -> int:
  """Runs `body()`; user errors become one line on stderr and exit status 2."""
  try:
    body()
  except USER_ERRORS as e:
    fail(prog, e)
  return 0


# ------------------------------------------------------------------------------------------
# Flags shared by the entry points that sample a model.


def define_model_flags(fv):
  """The flags that choose a model and how it samples (`sfd_jax.sample`, `sfd_jax.fid calc`)."""
  from sfd_jax import sampling  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('network', None, 'teacher: EDM snapshot .pkl, LDM / SD .ckpt or .safetensors (with --arch), '
                      'or converted teacher directory', flag_values=fv)
  flags.DEFINE_string('arch', None, 'architecture of an LDM / SD --network checkpoint: a preset (ldm-lsun-bedroom, '
                      'ldm-ffhq, sd-v1) or an LDM yaml path', flag_values=fv)
  flags.DEFINE_string('student', None, 'distilled student: training workdir or checkpoint directory', flag_values=fv)
  flags.DEFINE_string('seeds', '0-63', 'e.g. 0-49999 or 1,5,10-20', flag_values=fv)
  flags.DEFINE_integer('batch', 64, 'images per step over all devices', flag_values=fv)
  flags.DEFINE_integer('class', None, 'fixed class (conditional models)', flag_values=fv)
  flags.DEFINE_string('prompts', None, 'captions CSV with a `text` column (the MS-COCO 30k file): seed i takes '
                      'caption i (text-conditioned models; fid calc --metrics=clip)', flag_values=fv)
  flags.DEFINE_string('prompt', None, 'one caption for every seed (instead of --prompts)', flag_values=fv)
  flags.DEFINE_string('tokenizer', None, 'text-conditioned models: a CLIP tokenizer folder (vocab.json + merges.txt, '
                      'e.g. a diffusers SD download\'s tokenizer/); None: the installed open_clip_torch vocabulary',
                      flag_values=fv)
  flags.DEFINE_float('guidance', None, 'classifier-free guidance rate of a text-conditioned model; 1 runs the '
                     'conditional model alone (default 7.5, the official SD sampling rate)', flag_values=fv)
  d, ld = sampling.TEACHER_DEFAULTS, sampling.LATENT_TEACHER_DEFAULTS
  for name, kind, what in (('solver', 'string', f'teacher solver, one of {sorted(sampling.solvers.SOLVERS)} '
                                                f'(default {d.solver}; latent teachers {ld.solver})'),
                           ('num_steps', 'integer', f'time points, NFE + 1 (teacher default {d.num_steps}, latent '
                                                    f'{ld.num_steps}; an SFD-v student accepts it too)'),
                           ('schedule', 'string', f'one of {sorted(sampling.schedules.SCHEDULES)} (default '
                                                  f'{d.schedule_type}; latent teachers also and by default '
                                                  f'{ld.schedule_type})'),
                           ('rho', 'float', f'schedule exponent (default {d.schedule_rho}, latent {ld.schedule_rho})'),
                           ('sigma_min', 'float', f'default {d.sigma_min}, at least the network\'s (latent '
                                                  'teachers: theirs, LDM 0.006, SD 0.1)'),
                           ('sigma_max', 'float', f'default {d.sigma_max}, at most the network\'s (latent: sigma(1))'),
                           ('afs', 'boolean', 'analytical first step (saves one NFE)'),
                           ('max_order', 'integer', 'ipndm 1-4 / dpmpp 1-3')):
    getattr(flags, f'DEFINE_{kind}')(name, None, what, flag_values=fv)
  flags.DEFINE_boolean('predict_x0', True, 'DPM-Solver++ in data-prediction form', flag_values=fv)
  flags.DEFINE_boolean('lower_order_final', True, 'DPM-Solver++ lowers its order at the end', flag_values=fv)
  flags.DEFINE_boolean('thresholding', True, 'official dynamic thresholding in DPM-Solver++', flag_values=fv)
  flags.DEFINE_boolean('progress', True, 'show a progress bar', flag_values=fv)


def captions(fv):
  """What `--prompts` / `--prompt` give: the file's captions (a list), the one prompt (a str), or None.

  Raises:
    ValueError: both flags given; `PromptsError`: the prompts file is missing, has no `text`
      column or no rows (one line naming it).
  """
  from sfd_jax.clip import prompts  # pylint: disable=g-import-not-at-top
  if fv.prompts and fv.prompt is not None:
    raise ValueError('--prompts or --prompt: give one, not both')
  if fv.prompts:
    return prompts.read_prompts(fv.prompts)
  return fv.prompt


def model_batches(fv):
  """Loads the model the flags name; returns (its `generate_batches` stream, the seeds, the `sampling.Model`)."""
  from sfd_jax import sampling  # pylint: disable=g-import-not-at-top
  if not (fv.network or fv.student) or (fv.network and fv.student):
    raise ValueError('--network or --student: give the model to sample from (exactly one)')
  if fv.batch < 1:
    raise ValueError(f'--batch: need at least 1, got {fv.batch}')
  seeds = sampling.parse_seeds(fv.seeds)
  overrides = dict(solver=fv.solver, num_steps=fv.num_steps, schedule_type=fv.schedule, schedule_rho=fv.rho,
                   sigma_min=fv.sigma_min, sigma_max=fv.sigma_max, afs=fv.afs)
  options = sampling.SolverOptions(fv.max_order, fv.predict_x0, fv.lower_order_final, fv.thresholding)
  if fv.network:  # everything that can be checked before loading a network
    from sfd_jax import teacher  # pylint: disable=g-import-not-at-top
    sampling.validate(sampling.teacher_settings(latent=teacher.is_latent(fv.network, fv.arch), **overrides), options)
  elif fv.max_order is not None:
    raise ValueError('--max_order: a student samples with the settings stored in its checkpoint')
  texts = captions(fv)  # a bad prompts file is named before the network loads
  model = sampling.load_model(fv.network, fv.student, guidance=fv.guidance, tokenizer=fv.tokenizer, arch=fv.arch,
                              **overrides)
  batches = sampling.model_batches(model, seeds, options=options, batch_size=fv.batch, class_idx=fv['class'].value,
                                   progress=fv.progress, captions=texts, captions_source=fv.prompts or '--prompt')
  return batches, seeds, model
