"""CLIP's byte-level BPE tokenizer, offline, in the two flavours the SD teacher needs.

* `open_clip_tokenize`: open_clip's `SimpleTokenizer` (clean mode 'lower'), used by the official
  `clip_score.py`: ftfy, HTML unescaping, whitespace collapsing, lower case; padded with **0**.
* `sd_tokenize`: what SD's `FrozenCLIPEmbedder` feeds its text encoder (transformers' slow
  `CLIPTokenizer` of clip-vit-large-patch14, `truncation=True, max_length=77,
  padding='max_length'`): ftfy, whitespace collapsing, lower case, no HTML unescaping; padded
  with `<|endoftext|>` (49407).

Both are `[SOT] + BPE tokens + [EOT]`, cut to `context_length` with EOT in the last position.
Token id 0 is a real token (`!` inside a word), so padding is told by position, never by value.

The vocabulary is read as data, never downloaded: open_clip's wheel ships
`bpe_simple_vocab_16e6.txt.gz` (located with importlib; the package is not imported), or a
tokenizer folder (`vocab.json` + `merges.txt`, e.g. a diffusers-format SD download's
`tokenizer/`) given by path.
"""
import dataclasses
import functools
import gzip
import html
import importlib.util
import json
import os
import pathlib
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # 48,894: the vocabulary is 512 byte symbols + merges + 2 specials
OPEN_CLIP_SPECIALS = ('<start_of_text>', '<end_of_text>')
OPENAI_SPECIALS = ('<|startoftext|>', '<|endoftext|>')
BPE_FILE = 'bpe_simple_vocab_16e6.txt.gz'
# Pre-tokenisation (the specials are prepended as literal alternatives): contractions, letter
# runs, single digits, runs of other non-space characters.
_PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class VocabularyError(ValueError):
  """The BPE vocabulary is missing or malformed."""


def _module(name):
  """Imports an optional dependency, or raises one clean line saying how to install it."""
  try:
    return importlib.import_module(name)
  except ImportError:
    raise ImportError(f'the CLIP tokenizer needs the {name!r} package: pip install {name}') from None


def _byte_table() -> List[Tuple[int, str]]:
  """(byte, symbol) pairs in vocabulary order.

  Printable Latin-1 bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves, in byte order;
  the other bytes follow, in byte order, as the characters from U+0100 on.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in set(printable)]
  return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(others)]


def byte_symbols() -> List[str]:
  """The 256 byte symbols in vocabulary order (ids 0..255)."""
  return [symbol for _, symbol in _byte_table()]


@functools.lru_cache(maxsize=None)
def byte_encoder() -> Dict[int, str]:
  """Byte value -> its symbol."""
  return dict(_byte_table())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """A CLIP BPE vocabulary.

  Attributes:
    encoder: symbol string -> token id.
    ranks: merge pair -> its priority (lower merges first).
    sot, eot: ids of the start and end of text tokens.
    specials: the two literal strings that, found in a text, map to `sot` / `eot`.
    source: where the vocabulary was read from (for messages).
  """
  encoder: Mapping[str, int]
  ranks: Mapping[Tuple[str, str], int]
  sot: int
  eot: int
  specials: Tuple[str, str]
  source: str
  cache: Dict[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def _merge_pairs(lines, source) -> List[Tuple[str, str]]:
  pairs = [tuple(line.split()) for line in lines]
  if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
    raise VocabularyError(f'{source}: expected {NUM_MERGES} merges of two symbols, found {len(pairs)}')
  return pairs


def _vocabulary_from_merges(merges, specials, source) -> Vocabulary:
  """open_clip's construction: bytes, bytes + '</w>', each merge joined, then the two specials."""
  symbols = byte_symbols()
  names = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges] + list(specials)
  encoder = {name: i for i, name in enumerate(names)}
  ranks = {pair: i for i, pair in enumerate(merges)}
  return Vocabulary(encoder, ranks, encoder[specials[0]], encoder[specials[1]], tuple(specials), source)


def open_clip_bpe_file() -> pathlib.Path:
  """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed `open_clip_torch` wheel."""
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    raise VocabularyError(f'no CLIP vocabulary: install open_clip_torch (it ships {BPE_FILE}) '
                          'or pass a tokenizer folder with vocab.json and merges.txt')
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
  if not path.is_file():
    raise VocabularyError(f'{path}: no such file (open_clip_torch installed without its vocabulary)')
  return path


def _read_bpe_gz(path, specials) -> Vocabulary:
  try:
    with gzip.open(path) as f:
      lines = f.read().decode('utf-8').split('\n')
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise VocabularyError(f'{path}: not a readable gzipped merges file ({type(e).__name__}: {e})') from None
  return _vocabulary_from_merges(_merge_pairs(lines[1:1 + NUM_MERGES], path), specials, str(path))


def _read_folder(folder) -> Vocabulary:
  """A transformers `CLIPTokenizer` folder: `vocab.json` (symbol -> id) and `merges.txt`."""
  vocab_path, merges_path = pathlib.Path(folder) / 'vocab.json', pathlib.Path(folder) / 'merges.txt'
  for path in (vocab_path, merges_path):
    if not path.is_file():
      raise VocabularyError(f'{path}: no such file (a CLIP tokenizer folder holds vocab.json and merges.txt)')
  try:
    encoder = json.loads(vocab_path.read_text(encoding='utf-8'))
    lines = [line for line in merges_path.read_text(encoding='utf-8').split('\n')[1:] if line]
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise VocabularyError(f'{folder}: unreadable vocab.json / merges.txt ({type(e).__name__}: {e})') from None
  merges = _merge_pairs(lines[:NUM_MERGES], merges_path)
  symbols = byte_symbols()
  needed = [*symbols, *(s + '</w>' for s in symbols), *(a + b for a, b in merges), *OPENAI_SPECIALS]
  missing = next((name for name in needed if name not in encoder), None)
  if missing is not None:
    raise VocabularyError(f'{vocab_path}: no {missing!r} token')
  ranks = {pair: i for i, pair in enumerate(merges)}
  return Vocabulary(encoder, ranks, encoder[OPENAI_SPECIALS[0]], encoder[OPENAI_SPECIALS[1]], OPENAI_SPECIALS,
                    str(folder))


def load_vocabulary(source: Union[None, str, os.PathLike] = None, specials=OPEN_CLIP_SPECIALS) -> Vocabulary:
  """Reads a CLIP BPE vocabulary, never downloading.

  Args:
    source: None (open_clip's installed `bpe_simple_vocab_16e6.txt.gz`), a `.txt.gz` merges file,
      or a tokenizer folder holding `vocab.json` and `merges.txt`.
    specials: the literal start/end strings recognised in texts for a `.txt.gz` source
      (a folder always uses its own `<|startoftext|>` / `<|endoftext|>`).

  Returns:
    The `Vocabulary` (ids: 49406 start, 49407 end for CLIP's vocabulary).

  Raises:
    VocabularyError: the vocabulary is missing or malformed (one line naming the file).
  """
  if source is None:
    return _read_bpe_gz(open_clip_bpe_file(), specials)
  path = pathlib.Path(source)
  if path.is_dir():
    return _read_folder(path)
  if not path.is_file():
    raise VocabularyError(f'{path}: no such file or folder (expected {BPE_FILE} or a tokenizer folder)')
  return _read_bpe_gz(path, specials)


@functools.lru_cache(maxsize=None)
def installed_vocabulary(specials=OPEN_CLIP_SPECIALS) -> Vocabulary:
  """open_clip's installed vocabulary, read once per process."""
  return load_vocabulary(None, specials)


def bpe(word: str, ranks: Mapping[Tuple[str, str], int]) -> List[str]:
  """Byte-pair encodes one pre-token (already in byte symbols); the last symbol ends in '</w>'.

  The lowest-ranked adjacent pair is merged everywhere (left to right) until no pair is ranked.
  """
  parts = list(word[:-1]) + [word[-1] + '</w>']
  while len(parts) > 1:
    pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float('inf')))
    if pair not in ranks:
      break
    merged, i = [], 0
    while i < len(parts):
      if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
        merged.append(parts[i] + parts[i + 1])
        i += 2
      else:
        merged.append(parts[i])
        i += 1
    parts = merged
  return parts


def clean_open_clip(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, strip, collapse whitespace, lower."""
  text = html.unescape(html.unescape(_module('ftfy').fix_text(text))).strip()
  return ' '.join(text.split()).lower()


def clean_sd(text: str) -> str:
  """transformers' slow CLIPTokenizer cleaning: ftfy, collapse whitespace runs, strip, lower."""
  return re.sub(r'\s+', ' ', _module('ftfy').fix_text(text)).strip().lower()


@functools.lru_cache(maxsize=None)
def _pattern(specials):
  regex = _module('regex')
  return regex.compile('|'.join(regex.escape(s) for s in specials) + '|' + _PIECES, regex.IGNORECASE)


def encode(text: str, vocab: Vocabulary, clean=clean_open_clip) -> List[int]:
  """Token ids of a cleaned text, without start/end tokens."""
  to_symbol, ids = byte_encoder(), []
  for piece in _pattern(vocab.specials).findall(clean(text)):
    if piece in vocab.specials:
      ids.append(vocab.sot if piece == vocab.specials[0] else vocab.eot)
      continue
    if piece not in vocab.cache:
      word = ''.join(to_symbol[b] for b in piece.encode('utf-8'))
      vocab.cache[piece] = tuple(vocab.encoder[s] for s in bpe(word, vocab.ranks))
    ids.extend(vocab.cache[piece])
  return ids


def tokenize(texts: Sequence[str], vocab: Vocabulary, pad_id: int, clean=clean_open_clip,
             context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """`[N, context_length]` int64 ids: SOT, BPE tokens, EOT, then `pad_id`.

  A sequence longer than `context_length` keeps its first `context_length - 1` tokens and
  ends in EOT (the open_clip and transformers truncations agree on this).
  """
  if isinstance(texts, str):
    texts = [texts]
  out = np.full((len(texts), context_length), pad_id, np.int64)
  for row, text in zip(out, texts):
    ids = [vocab.sot] + encode(text, vocab, clean)[:context_length - 2] + [vocab.eot]
    row[:len(ids)] = ids
  return out


def open_clip_tokenize(texts: Sequence[str], vocab: Optional[Vocabulary] = None,
                       context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """open_clip's `get_tokenizer('ViT-g-14')(texts)`: padded with 0. `[N, 77]` int64."""
  vocab = vocab or installed_vocabulary()
  return tokenize(texts, vocab, 0, clean_open_clip, context_length)


def sd_tokenize(texts: Sequence[str], vocab: Optional[Vocabulary] = None,
                context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """The ids SD's `FrozenCLIPEmbedder` feeds CLIP: padded with EOT (49407). `[N, 77]` int64."""
  vocab = vocab or installed_vocabulary(OPENAI_SPECIALS)
  return tokenize(texts, vocab, vocab.eot, clean_sd, context_length)
