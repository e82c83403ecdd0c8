"""The offline CLIP tokenizers against the token ids the official code produced: open_clip's
(CLIP score, padded with 0) and SD's `FrozenCLIPEmbedder` (transformers' CLIPTokenizer, padded
with `<|endoftext|>`)."""
import gzip
import json
import re

import numpy as np
import pytest

from conftest import FIXTURES
from sfd_jax.clip import tokenizer


@pytest.fixture(scope='module')
def clip_t1():
  return np.load(FIXTURES / 'clip' / 'clip_T1.npz')


@pytest.fixture(scope='module')
def sd_text():
  """sd_tiny.npz's token ids and sd_tiny.json's prompts (README_sd_tiny_text.md)."""
  ldm = FIXTURES / 'ldm'
  return dict(np.load(ldm / 'sd_tiny.npz'), prompts=json.loads((ldm / 'sd_tiny.json').read_text())['prompts'])


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
  text = '  Fish &amp;\tChips\n '
  assert tokenizer.clean_open_clip(text) == tokenizer.clean_sd(text) == 'fish & chips'
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


def _open_clip_reference_tokenizer():
  """open_clip's own `SimpleTokenizer`, loaded from its file (the package's __init__ imports
  torchvision, which this environment cannot import; the tokenizer module needs only torch)."""
  import importlib.util
  import torch  # noqa: F401  (the reference module imports it)
  path = tokenizer.open_clip_bpe_file().parent / 'tokenizer.py'
  spec = importlib.util.spec_from_file_location('open_clip_reference_tokenizer', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer()


@pytest.mark.torch_reference
def test_open_clip_flavour_equals_open_clip_on_random_texts():
  """Seeded random texts mixing cases, accents, CJK, emoji, digits, punctuation, contractions,
  HTML entities, odd whitespace and the special-token literal, some over 77 tokens."""
  pieces = ['a', 'B', 'cat', 'DOGS', 'é', 'Ü', 'ß', 'ﬁ', '東京', '😀', '0', '42', '1,024', '.', '!', '??', '"',
            '’', "'s", "'T", "'ll", "o'clock", '&amp;', '&amp;amp;', '&lt;', '<b>', '-', '_', '#', '\t', '\n', '  ',
            ' ', '\u00a0', 'Ａ', '<start_of_text>', '<end_of_text>', 'crème brûlée', 'naïve']
  rng = np.random.default_rng(23)
  texts = [''.join(rng.choice(pieces, size=rng.integers(0, 60))) for _ in range(300)]
  reference = _open_clip_reference_tokenizer()(texts).numpy()
  ours = tokenizer.open_clip_tokenize(texts)
  assert (reference.argmax(-1) == 76).any()  # some texts are truncated
  np.testing.assert_array_equal(ours, reference)


def test_a_folder_missing_a_merged_symbol_is_refused(tmp_path):
  vocab = tokenizer.load_vocabulary(specials=tokenizer.OPENAI_SPECIALS)
  merges = sorted(vocab.ranks, key=vocab.ranks.get)
  encoder = dict(vocab.encoder)
  dropped = ''.join(merges[100])
  del encoder[dropped]
  (tmp_path / 'vocab.json').write_text(json.dumps(encoder), encoding='utf-8')
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges), encoding='utf-8')
  with pytest.raises(tokenizer.VocabularyError, match=re.escape(f"vocab.json: no '{dropped}' token")):
    tokenizer.load_vocabulary(tmp_path)
  (tmp_path / 'bad.txt.gz').write_bytes(b'not gzip')
  with pytest.raises(tokenizer.VocabularyError, match='bad.txt.gz: not a readable gzipped merges file'):
    tokenizer.load_vocabulary(tmp_path / 'bad.txt.gz')
