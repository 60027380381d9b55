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
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pkmlm.data.config import (  # noqa: F401 (default_cache_dir: re-exported)
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    DataConfig,
    check_data_config,
    default_cache_dir,
    extra_special_tokens,
)
from pkmlm.errors import ConfigError, DataError

# Bump when train_bpe's recipe changes: it is part of the cache key, so old cached files are unused.
TOKENIZER_FORMAT = 1


def eos_id(tok: Tokenizer) -> int:
    """The id of `EOS_TOKEN` in `tok`."""
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN!r} token; give a tokenizer.json that defines it")
    return token_id


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (fewer when the text has too few pairs to
    merge) trained on `texts`; EOS_TOKEN has id 0, then `special_tokens` ids 1, 2, ..."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError("data.vocab_size", vocab_size, f"an integer >= {MIN_VOCAB_SIZE} (256 bytes + EOS)")
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


def load_or_train_tokenizer(cfg: DataConfig, files: Any, cache_dir: str) -> Tuple[Tokenizer, Dict[str, Any]]:
    """The tokenizer of the prepared shards (`cfg.prepared`), else `cfg.tokenizer` when set, else a
    BPE trained on a sample of the stream: its first `cfg.tokenizer_docs` documents (after
    cleaning; from a mixture, interleaved by weight), cached in `{cache_dir}/tokenizers/{hash[:16]}.json`
    by a hash of that text, the vocab size and the special tokens. `files`: what `as_plan` takes.

    Returns the tokenizer and {"source": "prepared"|"file"|"cache"|"trained", "path", "hash",
    "vocab_size"} (`hash` is None for a given file). The vocab size is the tokenizer's own, which
    for a given file or a small corpus may differ from `cfg.vocab_size`: size the model from this
    one (the loop pads it to a multiple of 64).
    """
    from pkmlm.data.mixing import as_plan, sample_documents

    if cfg.prepared:
        from pkmlm.data.prepared import load_index, load_prepared_tokenizer

        index = load_index(cfg.prepared)
        tok, path = load_prepared_tokenizer(cfg.prepared, index)
        return tok, {"source": "prepared", "path": path, "hash": index.get("tokenizer_hash"),
                     "vocab_size": tok.get_vocab_size()}
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
        return tok, {"source": "file", "path": path, "hash": None, "vocab_size": tok.get_vocab_size()}

    check_data_config(cfg)  # vocab size (special tokens included), tokenizer_docs, ...
    plan = as_plan(cfg, files)
    specials = extra_special_tokens(cfg)

    def training_texts() -> Iterable[str]:
        return sample_documents(plan.sources, cfg, cfg.tokenizer_docs)

    # Two passes (hash, then train on a miss) keep memory bounded for any data.tokenizer_docs.
    digest, count = _texts_hash(training_texts(), cfg.vocab_size, specials)
    if count == 0:
        names = [s.name for s in plan.sources]
        raise DataError(f"the data sources {names} hold no document to train the tokenizer on; check "
                        "data.text_field and the cleaning settings (data.min_chars)")
    cache_path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "tokenizers", f"{digest[:16]}.json")
    info = {"path": cache_path, "hash": digest}
    if os.path.isfile(cache_path):
        try:
            tok = load_tokenizer(cache_path, key="tokenizer cache")
            return tok, {"source": "cache", **info, "vocab_size": tok.get_vocab_size()}
        except DataError:
            pass  # a damaged cache entry: train again and overwrite it

    tok = train_bpe(training_texts(), cfg.vocab_size, specials)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp_path = f"{cache_path}.{os.getpid()}.tmp"  # per process: concurrent ranks never share one
    try:
        tok.save(tmp_path)
        os.replace(tmp_path, cache_path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return tok, {"source": "trained", **info, "vocab_size": tok.get_vocab_size()}


def encode_documents(tok: Tokenizer, texts: List[str]) -> List[List[int]]:
    """Token ids of each text, no special tokens added. One batch call, which the Rust side
    parallelises; `encode_batch_fast` (tokenizers >= 0.21) gives the same ids without computing
    character offsets, about 30% faster."""
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
