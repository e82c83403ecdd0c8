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
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in ('sfd_jax', 'configs'):
        for a in node.names:
          aliases[a.asname or a.name] = f'{node.module}.{a.name}'
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
        module = importlib.import_module(aliases[node.value.id])
        assert hasattr(module, node.attr), f'{aliases[node.value.id]}.{node.attr} does not exist'
        calls += 1
  assert calls >= 5


@pytest.mark.slow
def test_notebook_runs_end_to_end_at_reduced_size(tmp_path):
  """Executes every cell (nbclient, CPU): the demo at reduced size; part 2 skipped without a teacher."""
  import os
  import nbclient
  import nbformat
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  env = dict(SFD_NOTEBOOK_SMALL='1', SFD_NOTEBOOK_WORKDIR=str(tmp_path), SFD_TEACHER_PKL='')
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this environment
  try:
    nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}}).execute()
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  report = json.loads((tmp_path / 'demo' / 'report.json').read_text())
  assert report['summary']['nfe'] == 2 and report['summary']['ratio'] > 0
  outputs = [o.get('text', '') for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert any('part 2 skipped' in text for text in outputs)
  images = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert images, 'the demo grid is displayed'
