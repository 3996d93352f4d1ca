"""Offline CLIP tokenizer built from the BPE merges shipped with the package.

``videoldm_jax/assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT licence, see
``assets/LICENSE-CLIP-BPE.txt``). From it we build the usual ``vocab.json`` / ``merges.txt`` pair (49408 ids:
256 byte symbols, their ``</w>`` word-final variants, the first 48894 merges, ``<|startoftext|>``,
``<|endoftext|>``) once into a cache directory and load it with ``transformers.CLIPTokenizer``. No network.

Text is cleaned the way CLIP's reference tokenizer does it (``ftfy.fix_text`` when ftfy is installed, HTML
unescaping, whitespace collapsing, Python lower-casing) before the fast tokenizer sees it, so ids match OpenAI
CLIP / OpenCLIP ``SimpleTokenizer``. Prompts are always plain text: a literal ``<|endoftext|>`` in a prompt is
split into pieces exactly as OpenCLIP does (OpenAI CLIP and stock transformers tokenizers would map it to EOS),
and with ``"!"`` padding ``"!!!"`` stays one token (stock transformers tokenizers configured with
``pad_token="!"``, e.g. diffusers' SD 2.x folders, split it into three pad ids).

Padding: SD 1.x (``FrozenCLIPEmbedder``) pads with ``<|endoftext|>`` (49407); OpenCLIP / SD 2.x pads with id 0
(the symbol ``"!"``). Padding never changes the conditioning of the real tokens (causal attention) but it does
change the padded positions' hidden states, which the U-Net attends to, so use the scheme the weights were
trained with.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import tempfile
import threading
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

BPE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges: 512 byte symbols + merges + 2 specials = 49408
PAD_CHOICES = ("!", EOS_TOKEN)
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokenizer split


def bytes_to_unicode() -> Dict[int, str]:
  """The byte-level BPE alphabet: every byte maps to a printable unicode character.

  Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...) map to code points
  256, 257, ... in byte order, so no symbol is whitespace or a control character. The dict order (printable
  bytes first, then the remapped ones) is the order of the first 256 vocabulary ids.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  mapping = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def build_vocab_and_merges(bpe_path: str = BPE_PATH) -> Tuple[Dict[str, int], List[str]]:
  """``(vocab, merges)`` of the CLIP tokenizer from the gzipped merge list (first line is a header)."""
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1:NUM_MERGES + 1]
  if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
    raise ValueError(f"{bpe_path}: expected {NUM_MERGES} merge lines of two symbols each")
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{bpe_path}: merge list produces duplicate tokens")
  return vocab, merges


def _default_cache_root() -> str:
  root = os.environ.get("VIDEOLDM_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "videoldm_jax")
  return root


def _atomic_write(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)  # atomic on POSIX: concurrent builders never see a half-written file
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def tokenizer_files(cache_root: str | None = None, bpe_path: str = BPE_PATH) -> str:
  """Writes ``vocab.json`` + ``merges.txt`` (once) and returns their directory.

  The directory name carries a hash of the merge file, so a changed asset never reuses stale files. Falls back
  to the system temp dir when the cache root is not writable.
  """
  with open(bpe_path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  roots = [cache_root or _default_cache_root(), os.path.join(tempfile.gettempdir(), "videoldm_jax")]
  last_error = None
  for root in roots:
    directory = os.path.join(root, f"clip_tokenizer_{digest}")
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
      return directory
    try:
      os.makedirs(directory, exist_ok=True)
      vocab, merges = build_vocab_and_merges(bpe_path)
      _atomic_write(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
      _atomic_write(vocab_path, json.dumps(vocab, ensure_ascii=False))
      return directory
    except OSError as e:
      last_error = e
  raise OSError(f"cannot write CLIP tokenizer files under {roots}: {last_error}")


_LOADED: Dict[Tuple[str, Any], Any] = {}
_LOAD_LOCK = threading.Lock()


def load_clip_tokenizer(pad_with: str = EOS_TOKEN, cache_root: str | None = None):
  """``transformers.CLIPTokenizer`` for CLIP ViT-L/14 and OpenCLIP ViT-H/14 (same vocabulary), built once.

  Safe to call from many threads at once (input pipeline read threads do): the first call builds under a lock,
  because transformers' lazy top-level module fails ``from transformers import CLIPTokenizer`` with an
  ImportError when several threads trigger its first import concurrently.

  Args:
    pad_with: ``"<|endoftext|>"`` (SD 1.x, id 49407) or ``"!"`` (OpenCLIP / SD 2.x, id 0).
    cache_root: where ``vocab.json``/``merges.txt`` are built (default ``~/.cache/videoldm_jax``).
  """
  if pad_with not in PAD_CHOICES:
    raise ValueError(f"pad_with must be one of {PAD_CHOICES}, got {pad_with!r}")
  key = (pad_with, cache_root)
  tok = _LOADED.get(key)
  if tok is None:
    with _LOAD_LOCK:
      tok = _LOADED.get(key)
      if tok is None:
        tok = _LOADED[key] = _build_clip_tokenizer(pad_with, cache_root)
  return tok


def _build_clip_tokenizer(pad_with: str, cache_root: str | None):
  from tokenizers import Regex, pre_tokenizers
  from transformers import CLIPTokenizer  # deferred: transformers is slow to import
  directory = tokenizer_files(cache_root)
  # A local directory: from_pretrained reads vocab.json + merges.txt and never touches the network.
  # split_special_tokens: prompt text is always plain text. Otherwise the pad symbol "!" (an added special token
  # once it is the pad token) would split "wow!!!" into single "!" ids, unlike CLIP ("!!!" is one token).
  tok = CLIPTokenizer.from_pretrained(directory, pad_token=pad_with, model_max_length=77, local_files_only=True,
                                      split_special_tokens=True)
  # CLIP's word pattern without the special-token alternatives, so literal "<|endoftext|>" splits like OpenCLIP.
  tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  expected_pad = 0 if pad_with == "!" else 49407
  if (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (49406, 49407, expected_pad):
    raise ValueError(f"unexpected special ids {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}")
  return tok


try:  # ftfy repairs mojibake and normalises quotes/width like CLIP's reference tokenizer; optional.
  import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
  _ftfy = None


def clean_text(text: str) -> str:
  """CLIP's text cleaning: ftfy (if installed), double HTML unescape, whitespace collapse, lower-case."""
  if _ftfy is not None:
    text = _ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


def tokenize(tokenizer, texts: Union[str, Sequence[str]], max_length: int = 77) -> np.ndarray:
  """``[b, max_length]`` int32 ids: ``<|startoftext|> tokens <|endoftext|> pad...``.

  Over-long texts keep their first ``max_length - 2`` tokens and still end in ``<|endoftext|>`` (as CLIP's
  reference truncation does).
  """
  if isinstance(texts, str):
    texts = [texts]
  cleaned = [clean_text(t) for t in texts]
  if not cleaned:
    return np.zeros((0, max_length), np.int32)
  ids = tokenizer(cleaned, padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")["input_ids"]
  return np.asarray(ids, dtype=np.int32)
