"""The house rules, checked on the source: no import cycle, no module imports an entry point,
entry points and `networks/__init__.py` stay thin, one restricted unpickler base."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / 'sfd_jax'
ENTRY_POINTS = ('sfd_jax.main', 'sfd_jax.sample', 'sfd_jax.convert', 'sfd_jax.fid.__main__', 'sfd_jax.demo.__main__',
                'sfd_jax.demo.pretrain')
THIN = 60  # lines


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules():
  return {module_name(p): p for p in PACKAGE.rglob('*.py')}


def imports_of(path: pathlib.Path, known) -> set:
  """sfd_jax modules imported anywhere in the file (function-level imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.update(f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in known else node.module
                   for a in node.names)
  return {name for name in found if name in known}


def graph():
  known = modules()
  return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_the_import_graph_has_no_cycle():
  edges, state, cycles = graph(), {}, []

  def visit(node, stack):
    state[node] = 'open'
    for child in sorted(edges[node]):
      if state.get(child) == 'open':
        cycles.append(stack[stack.index(child):] + [child] if child in stack else [node, child])
      elif child not in state:
        visit(child, stack + [child])
    state[node] = 'done'

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert not cycles, f'import cycles: {cycles}'


def test_no_module_imports_an_entry_point():
  offenders = {name: sorted(deps & set(ENTRY_POINTS)) for name, deps in graph().items() if deps & set(ENTRY_POINTS)}
  assert not offenders


@pytest.mark.parametrize('name', ENTRY_POINTS + ('sfd_jax.networks',))
def test_entry_points_and_networks_face_are_thin(name):
  path = modules()[name]
  assert len(path.read_text().splitlines()) <= THIN, f'{path} has grown past {THIN} lines'


def test_one_restricted_unpickler_base():
  """Every pickle.Unpickler subclass in the package derives from io.unpickler.RestrictedUnpickler."""
  direct = []
  for name, path in modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef):
        bases = {ast.unparse(b) for b in node.bases}
        if bases & {'pickle.Unpickler', 'Unpickler'}:
          direct.append(f'{name}.{node.name}')
  assert direct == ['sfd_jax.io.unpickler.RestrictedUnpickler']
