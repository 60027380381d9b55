"""Engram: conditional memory by hashed n-gram lookup (Cheng et al., DeepSeek-AI & Peking University,
"Conditional Memory via Scalable Lookup: A New Axis of Sparsity for Large Language Models", arXiv
2601.07372, January 2026).

Where a product-key memory (model/memory.py) is addressed by the hidden state, an Engram layer is
addressed by the last few token ids: its table rows are known from the input alone, the lookup is
O(1) and needs no top-k. The file follows the paper's architecture section, step by step:

  tokenizer compression       raw id -> canonical id (NFKC, accents stripped, lower case,
                              whitespace collapsed)                 `build_compression`
  sparse retrieval via        suffix n-grams of orders 2..N of the canonical ids, never across a
  hashed n-grams              document boundary                     `suffix_ngrams`
  multi-head hashing          H heads per order, each a table of a distinct prime size, a
                              multiplicative-XOR hash with seeded odd multipliers
                                                                    `hash_rows`, `plan_table_sizes`
                              the rows of all heads concatenated: e_t      `EngramLayer.lookup`
  context-aware gating        alpha_t = sigmoid(<RMSNorm(h_t), RMSNorm(W_K e_t)> / sqrt(d));
                              v~_t = alpha_t * W_V e_t                     `EngramLayer.forward`
                              Y = SiLU(Conv1D(RMSNorm(V~))) + V~: depthwise, causal, kernel 4,
                              dilation N                                   `EngramLayer.short_conv`
  placement                   Y is added to the residual stream before the block's attention
                              (`Block` adds it: a `SideLayer`; `EngramConfig.layers`, early layers)
  decoding                    the same, token by token, from a per-row history
                                                                   `EngramLayer.decode`

The variant (`Engram`, kind "engram"): its options sit in the flat `model.memory` group with an
`engram_` prefix (`EngramFields`; `engram_layers: []` is off), so an Engram layer can sit beside a
product-key memory in one model (the sparsity-allocation sweep). The layer is built from the config
alone: its canonical ids start as the identity over `model.vocab_size` ids (the pad id is
`vocab_size`, the hash multipliers are bounded by it), and the trainer installs the run's tokenizer
compression and end-of-text id into the persistent buffers (`EngramLayer.adapt_to_tokenizer`), which
checkpoints carry: eval, export, inspect, the harness and generate build the model from the config
and load the checkpoint as for any other model.

References read, not copied: the authors' demo (deepseek-ai/Engram, engram_demo_v1.py) as described
by Google's MaxText port (AI-Hypercomputer/maxtext, src/maxtext/layers/engram.py, Apache-2.0).
Differences on purpose, each marked "Differs:" beside the code:
  - document boundaries: n-grams and the convolution never reach across an end-of-text token (the
    references reset only at the window start); a position before its document's start reads a
    dedicated pad id, one past the canonical ids, so padding never collides with a real token;
  - the gate is the paper's equation; the demo's signed square root before the sigmoid is an option
    (`gate_signed_sqrt`, off by default);
  - W_K and W_V have no bias (the paper's equations; the demo and MaxText add one);
  - one branch: the paper integrates Engram with multi-branch hyper-connections (mHC, one gate per
    branch); this model has a single residual stream;
  - the short convolution is written as K shifted, masked multiply-adds (exact, and what makes the
    document mask possible) instead of a padded `conv1d`.

Shape legend (suffixes on tensor names):
  B  batch             T  sequence length       D  model dim
  N  max n-gram order (lags 0..N-1 of the suffix n-gram)
  H  hash heads per order                       R  rows read per token = (N - 1) * H
  E  embedding width of one row (`embed_dim // heads`); R * E = (N - 1) * embed_dim
  K  convolution taps (kernel size)             V  raw vocabulary size
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import DataError, require, require_one_of
from pkmlm.model.variants.base import MemoryVariant, SideLayer, option
from pkmlm.model.variants.registry import register, registered

# Bump when the canonical form or the file layout changes: a saved mapping of another format is refused.
COMPRESSION_FORMAT = 1
# The mapping's file name, saved beside the run's tokenizer.
COMPRESSION_FILE = "engram_compression.json"
# Per-layer seed stride for the hash multipliers: a prime, so that layers' generators never share a
# seed for any reasonable seed and layer count (the demo's PRIME_1 = 10007).
LAYER_SEED_STRIDE = 10007
# Keys of raw (undecodable) tokens carry this prefix, so they never equal a canonical text.
_RAW_KEY = "\x00raw:"


# The end-of-text id a layer assumes until the run's tokenizer is installed: pkmlm's BPE gives
# it id 0 (`pkmlm.data.tokenizer.train_bpe`); a tokenizer that does not is installed by the trainer.
DEFAULT_EOT_ID = 0


# How an Engram layer's parameters start (`engram_init`; `EngramLayer.reset_parameters` gives each
# one's reasons and sources; measured in docs/engram.md, "Initialisation"):
#   zero_tables  the tables at zero, W_K and W_V fan-in normal: the layer adds exactly nothing at step 0
#   residual     tables N(0, 1) (the demo's nn.Embedding default), W_V at the residual-projection std
#                (pkmlm's init until 2026-12-07: at step 0 the layer adds twice the residual stream's RMS)
#   maxtext      MaxText's: tables N(0, 1/E) (flax's embedding default), W_K and W_V fan-in normal
EngramInit = Literal["zero_tables", "residual", "maxtext"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class EngramConfig:
    """The Engram layers' placement and hyper-parameters.

    Defaults: the demo's per-order shape (8 heads, 512 dims per order, N = 3) with tables sized to
    match the parameter count of the 2019 product-key memory's default (512**2 slots x 256 dims =
    67.1M): 2 orders x 8 heads x ~65.5k rows x 64 dims = 67.1M at any model dim.
    """

    # 0-based transformer layers that get an Engram layer, added before the block's attention. The
    # paper places them early (the demo's layer_ids are [1, 15] of a 30-block model; the paper's
    # placement ablation favours an early layer, as we read it): layer 1 here, the second block.
    layers: List[int] = field(default_factory=lambda: [1])
    max_ngram: int = 3  # N: suffix n-grams of orders 2..N (the paper's default N = 3)
    heads: int = 8  # H: hash heads per order (the demo's n_head_per_ngram = 8)
    embed_dim: int = 512  # width of one order's concatenated heads (the demo's n_embed_per_ngram)
    # Minimum rows of one head's table; every head of every layer gets the smallest prime >= this
    # not used by another head (`plan_table_sizes`). The paper sizes tables per order; one size here.
    table_size: int = 65536
    kernel_size: int = 4  # taps of the short convolution (the paper: 4; its dilation is max_ngram)
    seed: int = 0  # the hash multipliers' seed (with the layer index: `hash_multipliers`)
    # Differs: the demo compresses the gate's logit with a signed square root before the sigmoid
    # ("prevents saturation"); the paper's equation has none. Off = the paper.
    gate_signed_sqrt: bool = False
    # Learning-rate multiplier of the hashed tables over optim.lr; they take no weight decay. The
    # paper trains its Engram embeddings with Adam at a larger learning rate than the backbone and
    # without weight decay; 5x is the factor as we read it (check the paper's training setup before a
    # sweep relies on it).
    tables_lr_mult: float = 5.0
    # How the parameters start: one of `EngramInit` (`EngramLayer.reset_parameters`). zero_tables: the
    # layer's output is exactly zero at step 0 (the residual stream as without it), as MaxText zero-inits
    # the convolution "to strictly preserve the identity mapping at the start of training".
    init: str = "zero_tables"

    def validate(self, prefix: str = "model.memory.", n_layers: Optional[int] = None) -> None:
        """Raise `ConfigError` on the first bad value; `n_layers` bounds the layer indices. Keys are
        named `prefix + field` (e.g. "model.memory.engram_" when the registry keeps these options
        in the flat `model.memory` group under an `engram_` prefix)."""
        layers = list(self.layers)
        for index in layers:
            bound = f"[0, {n_layers - 1}] for model.n_layers={n_layers}" if n_layers is not None else ">= 0"
            ok = _is_int(index) and index >= 0 and (n_layers is None or index < n_layers)
            require(ok, f"{prefix}layers", layers, f"each index must be in {bound}")
        require(len(set(layers)) == len(layers), f"{prefix}layers", layers, "indices must be distinct")
        require(
            _is_int(self.max_ngram) and 2 <= self.max_ngram <= 8,
            f"{prefix}max_ngram",
            self.max_ngram,
            "an integer in [2, 8] (orders 2..max_ngram)",
        )
        for name in ("heads", "embed_dim", "kernel_size"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, f"{prefix}{name}", value, "a positive integer")
        require(
            self.embed_dim % self.heads == 0,
            f"{prefix}embed_dim",
            self.embed_dim,
            f"a multiple of {prefix}heads={self.heads} (each head's rows are embed_dim / heads wide)",
        )
        require(
            _is_int(self.table_size) and self.table_size >= 2,
            f"{prefix}table_size",
            self.table_size,
            "an integer >= 2 (rows of one head's table, rounded up to a prime)",
        )
        require(_is_int(self.seed) and self.seed >= 0, f"{prefix}seed", self.seed, "an integer >= 0")
        require(
            isinstance(self.gate_signed_sqrt, bool),
            f"{prefix}gate_signed_sqrt",
            self.gate_signed_sqrt,
            "true or false",
        )
        require(
            _is_number(self.tables_lr_mult) and math.isfinite(self.tables_lr_mult) and self.tables_lr_mult > 0,
            f"{prefix}tables_lr_mult",
            self.tables_lr_mult,
            "a finite number > 0",
        )
        require_one_of(f"{prefix}init", self.init, EngramInit)


# --- tokenizer compression --------------------------------------------------------------


def canonical_text(text: str) -> str:
    """The canonical form of one token's text: NFKC, accents stripped (NFD, then the nonspacing marks
    removed), lower case, every whitespace run one space, stripped, except that a token of
    whitespace only stays one space. "" when nothing is left (the caller falls back to the text)."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn").lower()
    text = re.sub(r"\s+", " ", text)
    return text if text == " " else text.strip()


class Compression(NamedTuple):
    """A tokenizer's canonical ids: `canonical_ids` int64 `(V,)`, raw id -> canonical id in
    [0, size); `size` canonical ids in all (the pad id of the n-grams is `size`); the sha256 of the
    tokenizer's vocabulary, which a saved mapping must match."""

    canonical_ids: Tensor
    size: int
    tokenizer_sha256: str


def tokenizer_sha256(tok) -> str:
    """sha256 over the tokenizer's vocabulary (token, id) pairs, added tokens included: what the
    mapping depends on besides the decoder, and stable across save/load and runtime flags."""
    pairs = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def build_compression(tok) -> Compression:
    """The canonical id of every id of `tok` (a `tokenizers.Tokenizer`; duck-typed, so that this
    module imports no tokenizer library): equal canonical texts share an id, numbered in order of
    first appearance by raw id.

    Each id is decoded alone, special tokens kept. Byte-level BPE has tokens that are not whole
    UTF-8 characters (they decode to U+FFFD): those keep their raw token string as key, so distinct
    byte pieces stay distinct (as the demo does). Differs: raw keys carry a prefix that no canonical
    text has, so a byte piece never merges with a decodable token. A token whose canonical text is
    empty (a lone combining accent) keeps its decoded text.
    """
    size = tok.get_vocab_size(with_added_tokens=True)
    ids_V = torch.empty(size, dtype=torch.int64)
    key_to_id: Dict[str, int] = {}
    for raw in range(size):
        text = tok.decode([raw], skip_special_tokens=False)
        if "\ufffd" in text:
            key = _RAW_KEY + str(tok.id_to_token(raw))
        else:
            key = canonical_text(text) or text
        ids_V[raw] = key_to_id.setdefault(key, len(key_to_id))
    return Compression(ids_V, len(key_to_id), tokenizer_sha256(tok))


def compression_path(tokenizer_path: str) -> str:
    """Where the mapping of the tokenizer saved at `tokenizer_path` lives: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), COMPRESSION_FILE)


def save_compression(compression: Compression, path: str) -> None:
    """Write the mapping as JSON (atomically: a temporary file, then a rename)."""
    payload = {
        "format": COMPRESSION_FORMAT,
        "vocab_size": int(compression.canonical_ids.numel()),
        "canonical_size": int(compression.size),
        "tokenizer_sha256": compression.tokenizer_sha256,
        "canonical_ids": compression.canonical_ids.tolist(),
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def load_compression(path: str, tok) -> Compression:
    """The mapping saved at `path`, checked against `tok`: a `DataError` (one line naming the file,
    the problem and what to do) for a missing or unreadable file, another format, or a mapping made
    for another tokenizer (vocabulary size or hash)."""
    redo = f"delete {path} to rebuild it from the run's tokenizer"
    try:
        with open(path) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no Engram compression mapping there; build it with build_compression") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable Engram compression mapping ({e}); {redo}") from None
    if not isinstance(payload, dict) or payload.get("format") != COMPRESSION_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise DataError(f"{path}: Engram compression format {found!r}, expected {COMPRESSION_FORMAT}; {redo}")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if payload.get("vocab_size") != vocab_size:
        raise DataError(
            f"{path}: Engram compression mapping is for a vocabulary of {payload.get('vocab_size')} tokens, "
            f"the run's tokenizer has {vocab_size}; {redo}"
        )
    if payload.get("tokenizer_sha256") != tokenizer_sha256(tok):
        raise DataError(f"{path}: Engram compression mapping was built for another tokenizer (hash differs); {redo}")
    ids, size = payload.get("canonical_ids"), payload.get("canonical_size")
    if (
        not _is_int(size)
        or not isinstance(ids, list)
        or len(ids) != vocab_size
        or not all(_is_int(i) and 0 <= i < size for i in ids)
    ):
        raise DataError(f"{path}: Engram compression mapping is malformed (ids outside [0, canonical_size)); {redo}")
    return Compression(torch.tensor(ids, dtype=torch.int64), size, payload["tokenizer_sha256"])


# --- suffix n-grams and multi-head hashing -----------------------------------------------


def document_starts(idx_BT: Tensor, eot_id: int) -> Tensor:
    """`(B, T)` int64: the position where each token's document starts in its row: 0 (the window
    start), or one past the last end-of-text token before it. An end-of-text token belongs to the
    document it ends."""
    B, T = idx_BT.shape
    pos_BT = torch.arange(T, device=idx_BT.device).expand(B, T)
    after_eot_BT = torch.zeros_like(idx_BT, dtype=torch.bool)
    after_eot_BT[:, 1:] = idx_BT[:, :-1] == eot_id
    return torch.where(after_eot_BT, pos_BT, torch.zeros_like(pos_BT)).cummax(dim=1).values


def shift_in_document(x_BT: Tensor, lag: int, start_BT: Tensor, fill) -> Tensor:
    """`x` at position t - lag where that is inside t's document, else `fill`: `(B, T, ...)`."""
    if lag == 0:
        return x_BT
    T = x_BT.shape[1]
    shifted = torch.full_like(x_BT, fill)
    shifted[:, lag:] = x_BT[:, : T - lag]
    pos_BT = torch.arange(T, device=x_BT.device)
    visible_BT = (pos_BT - lag) >= start_BT  # also false for t < lag: the start is >= 0
    visible = visible_BT.view(*visible_BT.shape, *([1] * (x_BT.dim() - 2)))
    return torch.where(visible, shifted, torch.full_like(shifted, fill))


def suffix_ngrams(cids_BT: Tensor, start_BT: Tensor, pad_id: int, max_ngram: int) -> Tensor:
    """`(B, T, N)` canonical ids: column k holds the token at t - k, or `pad_id` where t - k lies
    before t's document start (an end-of-text token or the window start): the n-gram of order n at
    t is columns 0..n-1. Differs: the references pad only at the window start."""
    lags = [shift_in_document(cids_BT, k, start_BT, pad_id) for k in range(max_ngram)]
    return torch.stack(lags, dim=-1)


def is_prime(n: int) -> bool:
    """Trial division by 2, 3 and 6k +- 1 (table sizes are far below 2**40, so this is quick)."""
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    k = 5
    while k * k <= n:
        if n % k == 0 or n % (k + 2) == 0:
            return False
        k += 6
    return True


def plan_table_sizes(cfg: EngramConfig) -> Dict[int, List[int]]:
    """Each Engram layer's table sizes, order-major then head (`(N - 1) * H` primes per layer): the
    smallest primes >= `cfg.table_size`, each used once over all layers and heads, so that no two
    heads share a modulus and their collisions are independent (the paper's distinct primes)."""
    sizes: Dict[int, List[int]] = {}
    candidate = cfg.table_size
    for layer in sorted(cfg.layers):
        layer_sizes = []
        for _ in range((cfg.max_ngram - 1) * cfg.heads):
            while not is_prime(candidate):
                candidate += 1
            layer_sizes.append(candidate)
            candidate += 1
        sizes[layer] = layer_sizes
    return sizes


def hash_multipliers(seed: int, layer: int, canonical_size: int, max_ngram: int) -> Tensor:
    """`(N,)` int64 odd multipliers of one layer, from a generator seeded with
    `seed + LAYER_SEED_STRIDE * layer` (no global random state). Bounded so that any canonical id
    (pad included) times a multiplier stays below 2**63: the hash never overflows int64."""
    half_bound = max(1, (2**63 - 1) // (canonical_size + 1) // 2)
    generator = torch.Generator().manual_seed(seed + LAYER_SEED_STRIDE * layer)
    return torch.randint(0, half_bound, (max_ngram,), generator=generator, dtype=torch.int64) * 2 + 1


def hash_rows(grams_BTN: Tensor, multipliers_N: Tensor, sizes_R: Tensor, heads: int) -> Tensor:
    """`(B, T, R)` row ids, each within its own head's table: for order n, the multiplicative-XOR
    hash (g_0 m_0) ^ (g_1 m_1) ^ ... ^ (g_{n-1} m_{n-1}) of the n-gram's canonical ids, modulo each
    of the order's H prime sizes (the paper's multi-head hashing, in the demo's formulation). Orders
    2..N, order-major. The paper writes one hash function per head; here, as in the demo, an order's
    heads share the mix and differ by their prime modulus, which already makes their collisions
    (nearly) independent: two n-grams collide in two heads only if their mixes agree modulo both."""
    mix_BT = grams_BTN[..., 0] * multipliers_N[0]
    rows = []
    for n in range(2, grams_BTN.shape[-1] + 1):
        mix_BT = torch.bitwise_xor(mix_BT, grams_BTN[..., n - 1] * multipliers_N[n - 1])
        primes_H = sizes_R[(n - 2) * heads : (n - 1) * heads]
        rows.append(mix_BT.unsqueeze(-1) % primes_H)  # non-negative: the products stay below 2**63
    return torch.cat(rows, dim=-1)


@dataclass
class EngramDecodeState:
    """What an Engram layer keeps between decoding calls (`EngramLayer.decode`), per row: the raw ids
    `(B, L)` of the last L real tokens and their convolution inputs RMSNorm(v) `(B, L, D)`."""

    ids_BL: Tensor
    x_BLD: Tensor

    def keep(self, rows_R: Tensor) -> None:
        """Keep only rows `rows_R` (as `KVCache.keep`)."""
        self.ids_BL, self.x_BLD = self.ids_BL[rows_R], self.x_BLD[rows_R]


def _sparse_lookup(rows_BTR: Tensor, table_SE: Tensor) -> Tensor:
    """`EngramLayer.lookup` with a sparse gradient, outside any compiled graph."""
    return F.embedding(rows_BTR, table_SE, sparse=True).flatten(2)


# --- the layer -------------------------------------------------------------------------------------------


class EngramLayer(SideLayer):
    """One Engram layer: `(h (B, T, D), token ids (B, T))` -> `(B, T, D)`, to be added to the
    residual stream by the caller (`Block`: a `SideLayer`).

    Arguments are trusted (`EngramConfig.validate` checks the config; `plan_table_sizes` gives
    `table_sizes`). Shapes depend on the config alone: `vocab_size` raw ids, whose canonical ids
    start as the identity; `install_compression` (or `adapt_to_tokenizer`, the trainer's call) puts
    the run's tokenizer compression and end-of-text id in. The canonical ids, the end-of-text id
    and the hash multipliers are persistent buffers, so a checkpoint hashes exactly as the run that
    wrote it did.

    `eot_id` (a 0-d buffer): the raw end-of-text id; n-grams and the convolution never reach across it.
    `pad_id` = `vocab_size`: above every canonical id (a compression has at most one per raw id),
    so padding never collides with a real token.
    `sparse_grad`: the tables take sparse COO gradients of the rows read (for the lazy row-sparse
    Adam of `optim.sparse_values`; the optimizer sets it, as for `ProductKeyMemory`).
    `observer`: called with the detached row ids `(B, T, R)` (flat, into `tables`) and gate `(B, T)`
    of every forward (usage metrics: pkmlm/metrics/table_usage.py).
    """

    def __init__(self, dim: int, cfg: EngramConfig, layer: int, vocab_size: int, table_sizes: Sequence[int]):
        super().__init__()
        self.dim = dim
        self.layer = layer
        self.max_ngram = cfg.max_ngram
        self.heads = cfg.heads
        self.row_dim = cfg.embed_dim // cfg.heads  # E
        self.rows_per_token = (cfg.max_ngram - 1) * cfg.heads  # R
        self.memory_dim = self.rows_per_token * self.row_dim  # R * E: e_t's width
        self.kernel_size = cfg.kernel_size
        self.dilation = cfg.max_ngram  # the paper: dilation = the largest n-gram order
        self.gate_signed_sqrt = cfg.gate_signed_sqrt
        self.tables_lr_mult = cfg.tables_lr_mult
        self.init = cfg.init
        self.vocab_size = vocab_size
        self.pad_id = vocab_size  # above every canonical id: never a real token
        self.register_buffer("canonical_ids", torch.arange(vocab_size, dtype=torch.int64))
        self.register_buffer("eot_id", torch.tensor(DEFAULT_EOT_ID, dtype=torch.int64))
        # Bounded by the pad id, the largest id hashed: no compression can make the products overflow.
        self.register_buffer("multipliers", hash_multipliers(cfg.seed, layer, vocab_size, cfg.max_ngram))
        sizes = torch.tensor(list(table_sizes), dtype=torch.int64)
        # Derived from the config: not saved. One table holds every head's rows, head r from offset r.
        self.register_buffer("sizes", sizes, persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        # The hashed tables: one nn.Embedding, so that a sparse gradient and the lazy Adam see one
        # parameter of whole rows (as a product-key memory's values).
        self.tables = nn.Embedding(sum(int(n) for n in table_sizes), self.row_dim)  # no .item(): meta-device builds
        self.key_proj = nn.Linear(self.memory_dim, dim, bias=False)  # W_K; differs: no bias (the paper)
        self.value_proj = nn.Linear(self.memory_dim, dim, bias=False)  # W_V
        self.norm_h = nn.RMSNorm(dim)  # RMSNorm(h_t), the query
        self.norm_k = nn.RMSNorm(dim)  # RMSNorm(k_t), the key
        self.norm_conv = nn.RMSNorm(dim)  # before the convolution (the paper's Y equation)
        # Depthwise taps by lag: conv_weight[:, j] multiplies the input at t - j * dilation.
        self.conv_weight = nn.Parameter(torch.empty(dim, cfg.kernel_size))
        self.sparse_grad = False
        self.observer: Optional[Callable[[Tensor, Tensor], None]] = None
        self.reset_parameters()

    def reset_parameters(self, residual_std: Optional[float] = None) -> None:
        """The layer's own init, by `init` (`EngramInit`; measured in docs/engram.md, "Initialisation").

        zero_tables (the default): the tables start at zero, so e_t = 0 and the output Y is exactly
        zero at step 0: the model starts as it would without the layer, the principle MaxText states
        for the convolution's zero init ("to strictly preserve the identity mapping at the start of
        training"), here for the whole branch. Gradients still reach the tables at step 0 (dL/de =
        W_V^T (alpha * dL/dY), W_V random), so every row read moves at the first step; W_K and W_V
        take theirs from the second. A row holds only what training wrote into it: a row no n-gram
        has read adds nothing, where random rows add noise to the residual stream (with N(0, 1)
        tables and W_V at the residual std, twice its RMS entering block 1 of the tiny model). W_K
        and W_V: fan-in normal, std 1 / sqrt(R * E) (MaxText's kernel_init, nd_dense_init(1.0,
        "fan_in", "normal")), so the value's RMS equals the rows' RMS as they grow.

        residual: tables N(0, 1) (the demo's nn.Embedding default; the key is RMS-normalised, so their
        scale only sets W_V's), W_K PyTorch's Linear default, W_V N(0, `residual_std`) (the
        Transformer's 0.02 / sqrt(2 * n_layers) for residual projections, given by the caller; else
        PyTorch's default).

        maxtext: MaxText's Engram (src/maxtext/layers/engram.py): tables N(0, 1/E), flax's embedding
        default (variance_scaling(1.0, "fan_in", "normal"): rows of norm ~1; MaxText's is a
        truncated normal, a plain one here), W_K and W_V fan-in normal as above (MaxText adds zero
        biases; this layer has none).

        Every init: the norms' gains 1, and the convolution's taps zero, so that the layer starts as
        the gated value alone (SiLU(0) = 0; MaxText's zero kernel_init).
        """
        fan_in_std = 1.0 / math.sqrt(self.memory_dim)
        if self.init == "residual":
            nn.init.normal_(self.tables.weight, mean=0.0, std=1.0)
            self.key_proj.reset_parameters()
            if residual_std is None:
                self.value_proj.reset_parameters()
            else:
                nn.init.normal_(self.value_proj.weight, mean=0.0, std=residual_std)
        else:
            if self.init == "maxtext":
                nn.init.normal_(self.tables.weight, mean=0.0, std=1.0 / math.sqrt(self.row_dim))
            else:  # zero_tables
                nn.init.zeros_(self.tables.weight)
            nn.init.normal_(self.key_proj.weight, mean=0.0, std=fan_in_std)
            nn.init.normal_(self.value_proj.weight, mean=0.0, std=fan_in_std)
        for norm in (self.norm_h, self.norm_k, self.norm_conv):
            norm.reset_parameters()
        nn.init.zeros_(self.conv_weight)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, layer={self.layer}, max_ngram={self.max_ngram}, heads={self.heads}, "
            f"rows={self.tables.num_embeddings} x {self.row_dim}, kernel={self.kernel_size}, "
            f"dilation={self.dilation}, pad_id={self.pad_id}"
        )

    # --- the run's tokenizer ------------------------------------------------------------------------

    @torch.no_grad()
    def install_compression(self, compression: Compression, eot_id: int) -> None:
        """Hash the canonical ids of `compression` (raw id -> canonical id for the tokenizer's ids;
        ids past the tokenizer's, the model's vocabulary padding, keep their identity: no text has
        them) with `eot_id` as the end-of-text token."""
        V = compression.canonical_ids.numel()
        if V > self.vocab_size or compression.size > self.vocab_size:
            raise DataError(
                f"Engram compression of a {V}-token tokenizer does not fit model.vocab_size={self.vocab_size}; "
                "use the run's own tokenizer"
            )
        self.canonical_ids[:V] = compression.canonical_ids.to(self.canonical_ids.device)
        self.eot_id.fill_(eot_id)

    def adapt_to_tokenizer(self, tok: Any, eot_id: int, directory: str, write: bool) -> None:
        """The `SideLayer` hook: the compression saved in `directory` (`COMPRESSION_FILE`, checked
        against `tok` by `load_compression`), else built from `tok` (and saved there with `write`),
        installed with `eot_id`."""
        path = os.path.join(directory, COMPRESSION_FILE)
        if os.path.exists(path):
            compression = load_compression(path, tok)
        else:
            compression = build_compression(tok)
            if write:
                save_compression(compression, path)
        self.install_compression(compression, eot_id)

    # --- retrieval --------------------------------------------------------------------

    def rows(self, idx_BT: Tensor, start_BT: Optional[Tensor] = None) -> Tensor:
        """`(B, T, R)` int64 row ids into `tables` (each head's rows offset to its part)."""
        if start_BT is None:
            start_BT = document_starts(idx_BT, self.eot_id)
        grams_BTN = suffix_ngrams(self.canonical_ids[idx_BT], start_BT, self.pad_id, self.max_ngram)
        return hash_rows(grams_BTN, self.multipliers, self.sizes, self.heads) + self.offsets

    def lookup(self, rows_BTR: Tensor) -> Tensor:
        """`(B, T, R * E)`: the R rows read, concatenated (e_t)."""
        if self.sparse_grad and torch.compiler.is_compiling():
            # Inductor cannot lower a sparse gradient: under train.compile the lookup runs eagerly
            # (a graph break), as the product-key read's sparse path does (pkmlm.model.kernels).
            return torch.compiler.disable(_sparse_lookup)(rows_BTR, self.tables.weight)
        return F.embedding(rows_BTR, self.tables.weight, sparse=self.sparse_grad).flatten(2)

    # --- context-aware gating and the short convolution -----------------------------------------------

    def gate(self, h_BTD: Tensor, k_BTD: Tensor) -> Tensor:
        """`(B, T)` fp32: alpha_t = sigmoid(<RMSNorm(h_t), RMSNorm(k_t)> / sqrt(D)).

        In fp32 under any autocast: one scalar per token from a sum of D products, which bf16
        would round (and the norms' fp32 gains would meet bf16 inputs, a slower unfused path)."""
        logit_BT = (self.norm_h(h_BTD.float()) * self.norm_k(k_BTD.float())).sum(-1) / math.sqrt(self.dim)
        if self.gate_signed_sqrt:  # the demo's range compression (off by default: not in the paper)
            logit_BT = logit_BT.abs().clamp_min(1e-6).sqrt() * logit_BT.sign()
        return torch.sigmoid(logit_BT)

    def short_conv(self, v_BTD: Tensor, start_BT: Tensor) -> Tensor:
        """`(B, T, D)`: SiLU(Conv1D(RMSNorm(v))), depthwise and causal, tap j at lag j * dilation;
        a lag before the token's document start reads zero, as the window start's causal padding.

        Written as K shifted views of one zero-padded copy, each masked by document and
        multiply-added: three ops a tap (the masks are (B, T, 1)), where a masked shift built
        with `shift_in_document` takes six, and CPU time here is mostly elementwise ops.
        """
        return self.conv_taps(self.norm_conv(v_BTD), start_BT)

    def conv_taps(self, x_BTD: Tensor, start_BT: Tensor) -> Tensor:
        """`short_conv` on an already normalised input `x` = RMSNorm(v)."""
        T = x_BTD.shape[1]
        span = (self.kernel_size - 1) * self.dilation
        padded_BPD = F.pad(x_BTD, (0, 0, span, 0))  # P = span + T: zeros before the window start
        pos_T = torch.arange(T, device=x_BTD.device)
        out_BTD = x_BTD * self.conv_weight[:, 0]
        for j in range(1, self.kernel_size):
            lag = j * self.dilation
            keep_BT1 = ((pos_T - lag) >= start_BT).unsqueeze(-1).to(x_BTD.dtype)  # inside t's document
            shifted_BTD = padded_BPD[:, span - lag : span - lag + T]  # a view: x at t - lag
            out_BTD = torch.addcmul(out_BTD, shifted_BTD * keep_BT1, self.conv_weight[:, j])
        return F.silu(out_BTD)

    def forward(self, h_BTD: Tensor, idx_BT: Tensor) -> Tensor:
        """`h` the residual stream entering the block `(B, T, D)`, `idx` its raw token ids `(B, T)`
        -> Y `(B, T, D)`; the caller adds it to the residual stream."""
        start_BT = document_starts(idx_BT, self.eot_id)
        rows_BTR = self.rows(idx_BT, start_BT)
        e_BTM = self.lookup(rows_BTR)  # M = R * E
        gate_BT = self.gate(h_BTD, self.key_proj(e_BTM))
        if self.observer is not None:
            self.observer(rows_BTR.detach(), gate_BT.detach())
        v_BTD = gate_BT.unsqueeze(-1) * self.value_proj(e_BTM)
        return v_BTD + self.short_conv(v_BTD, start_BT)

    # --- incremental decoding ------------------------------------------------------------------------

    @property
    def history(self) -> int:
        """Real tokens a new token looks back at: N - 1 for its n-grams, (K - 1) x N for the taps."""
        return max(self.max_ngram - 1, (self.kernel_size - 1) * self.dilation)

    def new_decode_state(self, batch: int) -> "EngramDecodeState":
        """The state of `batch` rows before their first token: a history of end-of-text tokens, so
        the first real token starts a document (as at a window start)."""
        device = self.tables.weight.device
        ids_BL = torch.full((batch, self.history), int(self.eot_id), dtype=torch.int64, device=device)
        return EngramDecodeState(ids_BL, torch.zeros(batch, self.history, self.dim, device=device))

    @torch.no_grad()
    def decode(
        self, h_BTD: Tensor, idx_BT: Tensor, state: "EngramDecodeState", valid_BT: Optional[Tensor] = None
    ) -> Tensor:
        """`forward` for tokens that continue the rows of `state` (updated in place): the output at
        each real token equals `forward`'s at its place in its row's sequence of real tokens
        (tested). `valid_BT` (bool, default all true) marks the real tokens; a padding slot (left
        padding of prompts, or a row that sits a step out) is skipped, its output zero.

        Each row's real tokens are packed to the left behind its history (the last `history` real
        tokens and their convolution inputs RMSNorm(v)), the layer runs on that, and the outputs go
        back to their slots. The observer is not called (usage is measured on full forwards).
        """
        B, T = idx_BT.shape
        L = self.history
        if valid_BT is None:
            valid_BT = torch.ones_like(idx_BT, dtype=torch.bool)
        rank_BT = valid_BT.long().cumsum(1) - 1  # a real token's place among its row's new ones
        slot_BT = torch.where(valid_BT, rank_BT, torch.full_like(rank_BT, T))  # padding -> a dump slot
        ids_BT = idx_BT.new_full((B, T + 1), int(self.eot_id)).scatter_(1, slot_BT, idx_BT)[:, :T]
        h_packed_BTD = h_BTD.new_zeros(B, T + 1, self.dim)
        h_packed_BTD.scatter_(1, slot_BT.unsqueeze(-1).expand(B, T, self.dim), h_BTD)
        ids_BP = torch.cat([state.ids_BL, ids_BT], dim=1)  # P = L + T; after a row's real tokens: filler
        start_BP = document_starts(ids_BP, self.eot_id)
        e_BTM = self.lookup(self.rows(ids_BP, start_BP)[:, L:])
        gate_BT = self.gate(h_packed_BTD[:, :T], self.key_proj(e_BTM))
        v_BTD = gate_BT.unsqueeze(-1) * self.value_proj(e_BTM)
        x_BPD = torch.cat([state.x_BLD, self.norm_conv(v_BTD).to(state.x_BLD.dtype)], dim=1)
        packed_BTD = v_BTD + self.conv_taps(x_BPD, start_BP)[:, L:]
        out_BTD = packed_BTD.gather(1, rank_BT.clamp(min=0).unsqueeze(-1).expand(B, T, self.dim))
        out_BTD = out_BTD * valid_BT.unsqueeze(-1)
        # The new history: each row's last L real tokens, entries [n, n + L) of the packed P.
        keep_BL = valid_BT.long().sum(1, keepdim=True) + torch.arange(L, device=idx_BT.device)
        state.ids_BL = ids_BP.gather(1, keep_BL)
        state.x_BLD = x_BPD.gather(1, keep_BL.unsqueeze(-1).expand(B, L, self.dim))
        return out_BTD

    # --- accounting ------------------------------------------------------------------------------------

    def usage_groups(self) -> List[Tuple[str, int]]:
        """The table's rows by n-gram order, in order: `("order2", rows of its H heads)`, ..."""
        sizes = self.sizes.tolist()
        H = self.heads
        return [(f"order{2 + g}", sum(sizes[g * H : (g + 1) * H])) for g in range(self.max_ngram - 1)]

    def describe_reads(self, idx_BT: Tensor, decode: Callable[[List[int]], str], top: int = 10) -> List[str]:
        """For `pkmlm-inspect`: the hash collision rates per order on the sample (`collision_rates`)
        and the `top` rows read most with the n-grams that read them (`most_read_rows`), decoded."""
        lines = []
        rates = collision_rates(self, idx_BT)
        for n in range(2, self.max_ngram + 1):
            lines.append(
                f"order {n}: {rates[f'order{n}/ngrams']:,.0f} distinct n-grams, "
                f"{rates[f'order{n}/collision']:.1%} share a head's row with another, "
                f"{rates[f'order{n}/full_collision']:.1%} share the rows of every head"
            )
        for entry in most_read_rows(self, idx_BT, top=top):
            grams = ", ".join(
                f"{'|'.join('<doc start>' if i < 0 else repr(decode([i])) for i in raw)} x{n}"
                for raw, n in entry["ngrams"][:4]
            )
            more = f" (+{len(entry['ngrams']) - 4} more)" if len(entry["ngrams"]) > 4 else ""
            where = f"row {entry['row']:>8} (order {entry['order']}, head {entry['head']})"
            lines.append(f"{where}: {entry['reads']} reads: {grams}{more}")
        return lines

    def table_parameters(self) -> List[nn.Parameter]:
        """The hashed tables: for the optimizer's sparse value group (lazy Adam, their own learning
        rate, no weight decay)."""
        return [self.tables.weight]

    def count_parameters(self) -> Dict[str, int]:
        """total (all of the layer's parameters), tables (the hashed rows), active (what one token
        touches: every dense parameter and the R rows it reads)."""
        total = sum(p.numel() for p in self.parameters())
        tables = self.tables.weight.numel()
        return {"total": total, "tables": tables, "active": total - tables + self.memory_dim}

    def flops_per_token(self) -> float:
        """Training FLOPs per token by the 6 x multiply-adds rule of `Transformer.flops_per_token`:
        W_K and W_V (2 * R * E * D), the gate's dot product (D), the convolution's taps (K * D).
        The lookup multiplies nothing; hashing (integer ops), norms and the sigmoid are not
        counted, as in the references."""
        macs = 2 * self.memory_dim * self.dim + self.dim + self.kernel_size * self.dim
        return float(6 * macs)


# --- inspection: collisions and the most-read rows -------------------------------------------


def _shared(values: Tensor) -> Tensor:
    """`(U,)` bool: whether another entry (a row of a 2-D `values`) equals entry u."""
    _, inverse_U, counts = torch.unique(values, dim=0, return_inverse=True, return_counts=True)
    return counts[inverse_U] > 1


@torch.no_grad()
def collision_rates(layer, idx_BT: Tensor) -> dict[str, float]:
    """Hash collisions of `layer`  among the distinct n-grams of `idx_BT`.

    For each order n (`order{n}/...`): `collision` = the fraction of the distinct n-grams (of
    canonical ids, document padding included) whose row in a head also holds another distinct
    n-gram of the sample, averaged over the H heads; `full_collision` = the fraction that share
    their rows in all H heads with another n-gram. With uniform hashing into tables of S rows, M
    distinct n-grams collide in a head with probability about 1 - exp(-M / S).
    """
    start_BT = document_starts(idx_BT, layer.eot_id)
    grams_MN = suffix_ngrams(layer.canonical_ids[idx_BT], start_BT, layer.pad_id, layer.max_ngram).flatten(0, 1)
    rows_MR = layer.rows(idx_BT, start_BT).flatten(0, 1)
    stats = {}
    for n in range(2, layer.max_ngram + 1):
        # One representative per distinct n-gram: the hash is a function of the n-gram.
        _, inverse_M = torch.unique(grams_MN[:, :n], dim=0, return_inverse=True)
        first_U = torch.full((int(inverse_M.max()) + 1,), len(inverse_M), dtype=torch.int64)
        first_U.scatter_reduce_(0, inverse_M, torch.arange(len(inverse_M)), reduce="amin")
        heads = slice((n - 2) * layer.heads, (n - 1) * layer.heads)
        rows_UH = rows_MR[first_U, heads]
        shared_UH = torch.stack([_shared(rows_UH[:, h]) for h in range(layer.heads)], dim=1)
        stats[f"order{n}/collision"] = float(shared_UH.double().mean())
        stats[f"order{n}/full_collision"] = float(_shared(rows_UH).double().mean())
        stats[f"order{n}/ngrams"] = float(len(first_U))
    return stats


@torch.no_grad()
def most_read_rows(layer, idx_BT: Tensor, top: int = 10) -> list[dict]:
    """The `top` rows of `layer`  read most often on the sample `idx_BT`, most
    read first, each a dict: `row` (flat, into `layer.tables`), `order`, `head` (within the order),
    `reads`, and `ngrams`: the distinct n-grams that read it, most frequent first, each
    `(raw_ids, reads)` with `raw_ids` the first occurrence's raw token ids, oldest first, -1 for
    a position before the document start (decode them with the run's tokenizer). Several n-grams
    on one row are collisions, or n-grams equal after compression (they show with different raw
    ids but share one entry: compare their canonical ids)."""
    start_BT = document_starts(idx_BT, layer.eot_id)
    canon_MN = suffix_ngrams(layer.canonical_ids[idx_BT], start_BT, layer.pad_id, layer.max_ngram).flatten(0, 1)
    raw_MN = suffix_ngrams(idx_BT, start_BT, -1, layer.max_ngram).flatten(0, 1)
    rows_MR = layer.rows(idx_BT, start_BT).flatten(0, 1)
    count_S = torch.zeros(layer.tables.num_embeddings, dtype=torch.int64, device=rows_MR.device)
    count_S.index_add_(0, rows_MR.reshape(-1), torch.ones_like(rows_MR.reshape(-1)))
    reads, rows = count_S.topk(min(top, count_S.numel()))
    out = []
    for count, row in zip(reads.tolist(), rows.tolist()):
        if count == 0:
            break
        r = int(torch.searchsorted(layer.offsets, torch.tensor(row), right=True)) - 1  # its head column
        order, head = 2 + r // layer.heads, r % layer.heads
        found: dict[tuple, list] = {}  # canonical n-gram -> [first raw ids, reads]
        for m in (rows_MR[:, r] == row).nonzero().flatten().tolist():
            key = tuple(canon_MN[m, :order].tolist())
            entry = found.setdefault(key, [tuple(reversed(raw_MN[m, :order].tolist())), 0])
            entry[1] += 1
        ngrams = sorted(((raw, n) for raw, n in found.values()), key=lambda x: -x[1])
        out.append({"row": row, "order": order, "head": head, "reads": count, "ngrams": ngrams})
    return out


# --- the registered variant ---------------------------------------------------------------------


@dataclass
class EngramFields:
    """`model.memory.engram_*`: `EngramConfig`'s fields under an `engram_` prefix, in the flat
    `model.memory` group (an Engram layer sits beside a block, so it combines with any product-key
    memory). `engram_layers: []` (the default) is off. Defaults and their sources: `EngramConfig`."""

    engram_layers: List[int] = field(default_factory=list)  # 0-based layers with an Engram layer beside them; [] = off
    engram_max_ngram: int = 3  # N: suffix n-grams of orders 2..N (the paper's N = 3)
    engram_heads: int = 8  # hash heads per order (the demo's n_head_per_ngram)
    engram_embed_dim: int = 512  # width of one order's concatenated heads (the demo's n_embed_per_ngram)
    engram_table_size: int = 65536  # minimum rows of one head's table, rounded up to distinct primes
    engram_kernel_size: int = 4  # taps of the short causal convolution (dilation = engram_max_ngram)
    engram_seed: int = 0  # seed of the hash multipliers (with the layer index)
    engram_gate_signed_sqrt: bool = False  # the demo's signed square root of the gate logit (not the paper's)
    engram_tables_lr_mult: float = 5.0  # the tables' learning rate = optim.lr x this; no weight decay
    # zero_tables (output exactly zero at step 0) | residual (tables N(0, 1), W_V at the residual std:
    # the init until 2026-12-07) | maxtext (tables N(0, 1/E), fan-in W_K, W_V); docs/engram.md
    engram_init: str = "zero_tables"


PREFIX = "engram_"


def engram_config(memory: Any) -> EngramConfig:
    """The `EngramConfig` of a `model.memory` config (object or a saved config's dict)."""
    defaults = EngramFields()
    return EngramConfig(
        **{f.name: option(memory, PREFIX + f.name, getattr(defaults, PREFIX + f.name)) for f in fields(EngramConfig)}
    )


@register
class Engram(MemoryVariant):
    kind = "engram"
    display_name = "Engram"
    # Highest: an Engram layer sits beside any product-key memory, and the run is named "<it> + Engram"
    precedence = 100
    Fields = EngramFields
    example = {"engram_layers": [0], "engram_heads": 2, "engram_embed_dim": 16, "engram_table_size": 31}
    in_hf_export = False  # checkpoint/modeling_pkmlm.py has no Engram layer: `--format hf` refuses it
    side_name = "engram"

    @classmethod
    def describes(cls, memory: Any) -> bool:
        return bool(option(memory, "engram_layers"))

    @classmethod
    def label(cls, memory: Any) -> str:
        """ "Engram" alone, or "<the product-key variant> + Engram" beside memory layers."""
        if not option(memory, "layers"):
            return cls.display_name
        others = [v for v in registered() if v is not cls and v.describes(memory)]
        return f"{max(others, key=lambda v: v.precedence).label(memory)} + {cls.display_name}"

    @classmethod
    def details(cls, memory: Any) -> List[Tuple[int, str]]:
        if not cls.describes(memory):
            return []
        layers = ",".join(f"L{i}" for i in option(memory, "engram_layers"))
        return [(40, f"engram {layers}")]

    @classmethod
    def check(cls, memory: Any, prefix: str) -> None:
        if not option(memory, "engram_layers"):
            return
        # model.memory.shard_values shards the product-key tables only; Engram's are replicated like
        # any parameter (DDP averages their gradients): tests/e2e/test_distributed.py trains both on
        # 2 processes, resumes on 1 and 2, and compares with 1 process.
        engram_config(memory).validate(prefix=f"{prefix}.{PREFIX}")

    @classmethod
    def check_layers(cls, memory: Any, prefix: str, n_layers: int) -> None:
        engram_config(memory).validate(prefix=f"{prefix}.{PREFIX}", n_layers=n_layers)

    @classmethod
    def side_layers(cls, memory: Any) -> List[int]:
        return list(option(memory, "engram_layers") or [])

    @classmethod
    def build_side(cls, cfg: Any, layer: int) -> EngramLayer:
        ecfg = engram_config(cfg.memory)
        return EngramLayer(cfg.dim, ecfg, layer, cfg.vocab_size, plan_table_sizes(ecfg)[layer])
