"""A name → implementation table whose KeyError lists the valid names (solvers, schedules)."""


class Registry(dict):
  """A dict of named implementations; `registry['typo']` raises a KeyError naming the valid keys."""

  def __init__(self, kind: str, entries: dict):
    super().__init__(entries)
    self.kind = kind

  def __missing__(self, key):
    raise KeyError(f'{key!r}: unknown {self.kind}; valid: {sorted(self)}')
