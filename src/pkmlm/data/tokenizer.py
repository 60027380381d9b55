"""Tokenizer: byte-level BPE trained from the stream (cached by content hash) or a given tokenizer.json.

Our BPE (`train_bpe`) follows GPT-2: text is split by the GPT-2 pre-tokenization regex over its
UTF-8 bytes (`ByteLevel`, no prefix space), every one of the 256 bytes is in the initial alphabet,
so any text encodes without an unknown token and decodes back exactly. `EOS_TOKEN` is the only
special token and has id 0 in our tokenizers (a loaded tokenizer.json may put it elsewhere: ask
`eos_id(tok)`). It separates documents; the packer inserts it, never the text: tokenizers from
this module encode a literal "<|endoftext|>" in a document as ordinary bytes
(`encode_special_tokens`, a runtime flag that tokenizer.json does not store, hence
`load_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pkmlm.data.config import (  # noqa: F401 (default_cache_dir: re-exported)
    EOS_TOKEN,
    MAX_DOC_CHARS,
    DataConfig,
    default_cache_dir,
    extra_special_tokens,
)
from pkmlm.errors import DataError

# Bump when train_bpe's recipe changes: it is part of the cache key, so old cached files are unused.
TOKENIZER_FORMAT = 1


def eos_id(tok: Tokenizer) -> int:
    """The id of `EOS_TOKEN` in `tok`."""
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN!r} token; give a tokenizer.json that defines it")
    return token_id


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (>= 257, MIN_VOCAB_SIZE; fewer when the text has
    too few pairs to merge) trained on `texts`; EOS_TOKEN has id 0, then `special_tokens` ids 1, 2, ..."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *[t for t in special_tokens if t != EOS_TOKEN]],  # in order: ids 0, 1, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str, key: str = "data.tokenizer") -> Tokenizer:
    """Load a tokenizer.json that defines EOS_TOKEN; errors name `key` (the config key it came from)."""
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(resolved):
        raise DataError(f"{key}={path!r}: no such file ({resolved}); give a tokenizer.json path, or null to train one")
    try:
        tok = Tokenizer.from_file(resolved)
    except Exception as e:  # the Rust side raises a plain Exception for any parse error
        raise DataError(f"{key}={path!r} is not a valid tokenizer.json ({str(e)[:200]})") from None
    if tok.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"{key}={path!r} has no {EOS_TOKEN!r} token; the packer needs it between documents")
    tok.encode_special_tokens = True
    return tok


def tokenizer_from_str(text: str) -> Tokenizer:
    """A tokenizer saved with `Tokenizer.to_str()` (as in checkpoints), with our runtime flags set."""
    tok = Tokenizer.from_str(text)
    tok.encode_special_tokens = True
    return tok


def checked_tokenizer(text: object, where: str, vocab_size: int | None = None) -> Tokenizer:
    """The schema check of a saved tokenizer (a checkpoint's `tokenizer`, an export's
    tokenizer.json): it parses, and (given the model's `vocab_size`) none of its ids lies outside
    the model's embedding (ids past it would be silently wrong, then an IndexError). One-line
    `DataError` naming `where` otherwise."""
    if not isinstance(text, str):
        raise DataError(f"{where}: the tokenizer is {type(text).__name__}, not a tokenizer's JSON; the file was edited")
    try:
        tok = tokenizer_from_str(text)
    except Exception as e:  # noqa: BLE001 - the Rust parser's errors are plain Exceptions
        raise DataError(f"{where}: not a tokenizer ({str(e).splitlines()[0][:120]}); the file was edited") from None
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise DataError(
            f"{where}: the tokenizer has {tok.get_vocab_size()} tokens, more than the model's vocabulary of "
            f"{vocab_size}; the file was edited or belongs to another model"
        )
    return tok


def _texts_hash(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> Tuple[str, int]:
    """sha256 over the recipe version, vocab size, special tokens (when any) and the
    length-prefixed UTF-8 of each text."""
    header = f"pkmlm-bpe/v{TOKENIZER_FORMAT}/vocab_size={vocab_size}\n"
    if special_tokens:
        header += f"special_tokens={json.dumps(list(special_tokens))}\n"
    h = hashlib.sha256(header.encode())
    count = 0
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        count += 1
    return h.hexdigest(), count


def cached_bpe(
    texts: Callable[[], Iterable[str]], cfg: DataConfig, cache_dir: str, empty_message: str
) -> Tuple[Tokenizer, Dict[str, Any]]:
    """A BPE trained on `texts()` per `cfg` (vocab size, special tokens), cached in
    `{cache_dir}/tokenizers/{hash[:16]}.json` by a hash of that text, the vocab size and the special
    tokens. `texts` is called once or twice (hash, then train on a miss: memory stays bounded for
    any data.tokenizer_docs); DataError(`empty_message`) when it yields no text. Training reads
    each text in pieces of at most `cfg.max_doc_chars` characters (see `split_document`)."""
    specials = extra_special_tokens(cfg)
    digest, count = _texts_hash(texts(), cfg.vocab_size, specials)
    if count == 0:
        raise DataError(empty_message)
    cache_path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "tokenizers", f"{digest[:16]}.json")
    info = {"path": cache_path, "hash": digest}
    if os.path.isfile(cache_path):
        try:
            tok = load_tokenizer(cache_path, key="tokenizer cache")
            return tok, {"source": "cache", **info, "vocab_size": tok.get_vocab_size()}
        except DataError:
            pass  # a damaged cache entry: train again and overwrite it

    pieces = (piece for text in texts() for piece in split_document(text, cfg.max_doc_chars))
    tok = train_bpe(pieces, cfg.vocab_size, specials)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp_path = f"{cache_path}.{os.getpid()}.tmp"  # per process: concurrent ranks never share one
    try:
        tok.save(tmp_path)
        os.replace(tmp_path, cache_path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return tok, {"source": "trained", **info, "vocab_size": tok.get_vocab_size()}


def check_special_tokens(tok: Tokenizer, cfg: DataConfig, key: str = "data.tokenizer") -> None:
    """A given tokenizer must define every `data.special_tokens` entry: they are not added to it."""
    missing = [t for t in extra_special_tokens(cfg) if tok.token_to_id(t) is None]
    if missing:
        raise DataError(
            f"{key}={cfg.tokenizer!r} lacks data.special_tokens {missing}; give a tokenizer.json that "
            "defines them, or drop them from data.special_tokens"
        )


def split_document(text: str, max_chars: int) -> List[str]:
    """`text` in pieces of at most `max_chars` characters, each cut just before a run of
    whitespace where the piece has one. Byte-level BPE pre-tokenization (the GPT-2 regex) already
    splits the text there (a word takes the single space before it; a run of spaces ends before
    the last one), so the pieces' ids, concatenated, are the whole text's; only a piece with no
    whitespace at all is cut at `max_chars` exactly, which may split one pre-token in two."""
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(c, start + 1, end + 1) for c in " \n\t\r")  # a whitespace at text[cut]
        while cut > start + 1 and text[cut - 1] in " \n\t\r":
            cut -= 1  # to the start of its run
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_documents(tok: Tokenizer, texts: List[str], max_chars: int = MAX_DOC_CHARS) -> List[List[int]]:
    """Token ids of each text, no special tokens added. One batch call, which the Rust side
    parallelises; `encode_batch_fast` (tokenizers >= 0.21) gives the same ids without computing
    character offsets, about 30% faster. A text longer than `max_chars` (data.max_doc_chars) goes
    in as pieces (`split_document`) whose ids are joined: the tokenizer needs about 170 bytes per
    character of one input (a 200 MB document asked for 13.7 GB), so no input is longer."""
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    if all(len(t) <= max_chars for t in texts):
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    pieces = [split_document(t, max_chars) for t in texts]
    flat = [p for doc in pieces for p in doc]
    ids = [e.ids for e in encode(flat, add_special_tokens=False)]
    out, i = [], 0
    for doc in pieces:
        out.append([t for piece_ids in ids[i : i + len(doc)] for t in piece_ids])
        i += len(doc)
    return out
