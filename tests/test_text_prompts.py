"""Prompt files: a CSV with a `text` column, read as the official code reads the MS-COCO captions."""
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
