"""The offline CLIP tokenizers against the token ids the official code produced: open_clip's
(CLIP score, padded with 0) and SD's `FrozenCLIPEmbedder` (transformers' CLIPTokenizer, padded
with `<|endoftext|>`)."""
import gzip
import json

import numpy as np
import pytest

from conftest import FIXTURES
from sfd_jax.clip import tokenizer


@pytest.fixture(scope='module')
def clip_t1():
  return np.load(FIXTURES / 'clip' / 'clip_T1.npz')


@pytest.fixture(scope='module')
def sd_text():
  return np.load(FIXTURES / 'ldm' / 'sd_tiny_text.npz')


def test_open_clip_ids_of_the_clip_score_captions(clip_t1):
  ids = tokenizer.open_clip_tokenize(list(clip_t1['captions']))
  np.testing.assert_array_equal(ids, clip_t1['token_ids'])
  np.testing.assert_array_equal(ids.argmax(-1), clip_t1['eot_index'])


def test_open_clip_ids_of_the_sd_prompts(sd_text):
  np.testing.assert_array_equal(tokenizer.open_clip_tokenize(list(sd_text['prompts'])), sd_text['token_ids_open_clip'])


def test_sd_ids_pad_with_end_of_text(sd_text):
  ids = tokenizer.sd_tokenize(list(sd_text['prompts']))
  np.testing.assert_array_equal(ids, sd_text['token_ids'])
  assert ids.dtype == np.int64 and ids[0, 1:].tolist() == [49407] * 76


def test_a_genuine_zero_before_end_of_text(clip_t1):
  """Caption 0 ends in 'wall!??': '!' inside a word is id 0, which is not padding."""
  ids = tokenizer.open_clip_tokenize([clip_t1['captions'][0]])[0]
  eot = int(np.argmax(ids))
  assert ids[eot] == 49407 and 0 in ids[:eot].tolist()


def test_truncation_keeps_75_tokens_and_ends_in_eot(clip_t1):
  vocab = tokenizer.load_vocabulary()
  text = str(clip_t1['captions'][4])
  full = tokenizer.encode(text, vocab)
  assert len(full) == 78
  ids = tokenizer.open_clip_tokenize([text], vocab)[0]
  assert ids[0] == 49406 and ids[-1] == 49407 and ids[1:-1].tolist() == full[:75]


def test_cleaning_flavours_differ_in_html_entities():
  """ftfy alone unescapes HTML entities only in texts without '<'; open_clip unescapes always."""
  assert tokenizer.clean_open_clip('  Fish &amp;\tChips\n ') == tokenizer.clean_sd('  Fish &amp;\tChips\n ') == 'fish & chips'
  assert tokenizer.clean_open_clip('<b>A &amp; B</b>') == '<b>a & b</b>'
  assert tokenizer.clean_sd('<b>A &amp; B</b>') == '<b>a &amp; b</b>'
  assert tokenizer.clean_open_clip('o’clock') == tokenizer.clean_sd('o’clock') == "o'clock"


def test_tokenizer_folder_gives_the_same_ids(tmp_path, sd_text):
  """A transformers tokenizer folder (vocab.json + merges.txt), written here from the wheel's
  merges in the order `vocab.json` files hold them, is a second path to the same ids."""
  bpe_file = tokenizer.open_clip_bpe_file()
  merges = gzip.open(bpe_file).read().decode('utf-8').split('\n')[1:1 + tokenizer.NUM_MERGES]
  vocab = tokenizer.load_vocabulary(specials=tokenizer.OPENAI_SPECIALS)
  (tmp_path / 'vocab.json').write_text(json.dumps(dict(sorted(vocab.encoder.items()))), encoding='utf-8')
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n', encoding='utf-8')
  folder = tokenizer.load_vocabulary(tmp_path)
  assert folder.specials == tokenizer.OPENAI_SPECIALS and (folder.sot, folder.eot) == (49406, 49407)
  np.testing.assert_array_equal(tokenizer.sd_tokenize(list(sd_text['prompts']), folder), sd_text['token_ids'])


def test_missing_vocabulary_is_one_clean_line(tmp_path):
  with pytest.raises(tokenizer.VocabularyError, match='vocab.json: no such file'):
    tokenizer.load_vocabulary(tmp_path)
  with pytest.raises(tokenizer.VocabularyError, match='nothing.txt.gz: no such file'):
    tokenizer.load_vocabulary(tmp_path / 'nothing.txt.gz')


def test_byte_symbols_cover_every_byte_once():
  symbols = tokenizer.byte_symbols()
  assert len(set(symbols)) == 256 and symbols[0] == '!' and tokenizer.byte_encoder()[ord(' ')] == 'Ġ'
