"""Prompt files: a CSV with a `text` column, read as the official code reads the MS-COCO captions."""
import jax
import numpy as np
import pytest

from sfd_jax.clip import prompts


def test_text_column_in_file_order(tmp_path):
  path = tmp_path / 'captions.csv'
  path.write_text('id,text\n7,"A cat, on a mat"\n3,café au lait\n5,"two\nlines"\n9,\n', encoding='utf-8')
  assert prompts.read_prompts(path) == ['A cat, on a mat', 'café au lait', 'two\nlines', '']


@pytest.mark.parametrize('content, message', [
    ('id,caption\n1,a cat\n', "no 'text' column"),
    ('', "no 'text' column"),
    ('text\n', 'holds no prompts'),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, content, message):
  path = tmp_path / 'prompts.csv'
  path.write_text(content, encoding='utf-8')
  with pytest.raises(prompts.PromptsError, match=message) as info:
    prompts.read_prompts(path)
  assert str(info.value).startswith(str(path)) and '\n' not in str(info.value)


def test_missing_file(tmp_path):
  with pytest.raises(prompts.PromptsError, match='no such prompts file'):
    prompts.read_prompts(tmp_path / 'nothing.csv')


def test_draw_prompts_is_distinct_keyed_and_jittable():
  key = jax.random.key(5)
  first = np.asarray(jax.jit(prompts.draw_prompts, static_argnums=(1, 2))(key, 10, 10))
  assert sorted(first.tolist()) == list(range(10))  # a full draw is a permutation: no repeats
  again = np.asarray(prompts.draw_prompts(key, 10, 10))
  np.testing.assert_array_equal(first, again)
  draws = {tuple(np.asarray(prompts.draw_prompts(jax.random.fold_in(key, i), 30000, 4)).tolist()) for i in range(5)}
  assert len(draws) == 5 and all(len(set(d)) == 4 and 0 <= min(d) and max(d) < 30000 for d in draws)
  with pytest.raises(ValueError, match='cannot draw 3 distinct prompts out of 2'):
    prompts.draw_prompts(key, 2, 3)
