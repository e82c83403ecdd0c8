"""The Colab notebook calls functions that exist, with code that compiles."""
import ast
import json
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / 'notebooks' / 'colab_tpu.ipynb'


def python_cells():
  cells = json.loads(NOTEBOOK.read_text())['cells']
  for cell in cells:
    if cell['cell_type'] == 'code':
      # IPython magics and shell escapes are not Python (they become `pass`); the rest must be.
      lines = [l[:len(l) - len(l.lstrip())] + 'pass' if l.strip().startswith(('!', '%')) else l
               for l in ''.join(cell['source']).splitlines()]
      yield '\n'.join(lines)


def test_cells_compile_and_name_real_functions():
  import importlib
  calls, aliases = 0, {}  # one namespace across cells, as in the notebook
  for source in python_cells():
    tree = ast.parse(source)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module in ('sfd_jax', 'configs'):
        for a in node.names:
          aliases[a.asname or a.name] = f'{node.module}.{a.name}'
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
        module = importlib.import_module(aliases[node.value.id])
        assert hasattr(module, node.attr), f'{aliases[node.value.id]}.{node.attr} does not exist'
        calls += 1
  assert calls >= 5
