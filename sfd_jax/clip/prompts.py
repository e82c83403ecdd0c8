"""Caption / prompt files: a CSV with a `text` column (the official MS-COCO 30k captions file),
read as the official code reads it (`csv.DictReader`, one caption per row, in file order), and
the per-iteration draw of distinct prompts."""
import csv
import os
from typing import List, Sequence, Union

import jax


class PromptsError(ValueError):
  """A prompts file is missing, has no `text` column, or holds no prompts."""


def read_prompts(path, column: str = 'text') -> List[str]:
  """The `column` of every row of a CSV file, in order.

  Raises:
    PromptsError: one line naming the file when it is missing, unreadable as UTF-8, has no
      `column` header, or has no rows.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PromptsError(f'{path}: no such prompts file')
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None or column not in reader.fieldnames:
        raise PromptsError(f'{path}: no {column!r} column (header: {reader.fieldnames or "none"})')
      prompts = [row[column] or '' for row in reader]
  except (UnicodeDecodeError, csv.Error) as e:
    raise PromptsError(f'{path}: not a readable CSV file ({type(e).__name__}: {e})') from None
  if not prompts:
    raise PromptsError(f'{path}: holds no prompts (a header and no rows)')
  return prompts


def draw_prompts(key, num_prompts: int, batch_size: int):
  """Indices of `batch_size` distinct prompts out of `num_prompts`, drawn from `key` (the official
  loop's `random.sample(captions, batch)`, on a JAX key); jit-able.

  Returns:
    `[batch_size]` int32 indices into the prompt table.
  """
  if batch_size > num_prompts:
    raise ValueError(f'cannot draw {batch_size} distinct prompts out of {num_prompts}')
  return jax.random.choice(key, num_prompts, (batch_size,), replace=False)


def captions_at(captions: Union[str, Sequence[str]], indices, source: str = '--prompts',
                what: str = 'image') -> List[str]:
  """Caption i for each index i (seed i, or the i-th image in sorted order), as the official
  `sample.py` and `clip_score.py` pair them; a single str is everyone's caption.

  Raises:
    PromptsError: an index past the last caption (one line naming `source`).
  """
  indices = [int(i) for i in indices]
  if isinstance(captions, str):
    return [captions] * len(indices)
  if indices and max(indices) >= len(captions):
    raise PromptsError(f'{source}: holds {len(captions)} captions, but {what} {max(indices)} takes caption '
                       f'{max(indices)} ({what} i takes caption i)')
  return [captions[i] for i in indices]
