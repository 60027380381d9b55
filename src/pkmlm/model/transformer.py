"""A decoder-only, pre-norm transformer language model whose FFNs may be product-key memories.

Layer i's mixer (after attention) is an FFN, a `ProductKeyMemory` instead of the FFN
(`memory.placement=replace`, as in Lample et al. 2019), or both summed
(`memory.placement=parallel`). A variant that is not a product-key memory (e.g. Engram's hashed
n-gram tables) adds a `SideLayer` beside the block (`blocks.<i>.<side_name>`): it reads the residual
stream and the token ids before the block's attention and its output is added to the stream
(pkmlm/model/variants/base.py). Everything else is GPT-2 as nanoGPT writes it, with rotary
position embeddings (Su et al. 2021, RoFormer) as the default. The model knows nothing of
distribution, compilation, precision policy or logging.

Contracts for the code around the model:
  - `model(idx, targets)` -> `(logits, loss)`; `model(idx, targets, return_aux=True)` ->
    `(logits, loss, aux_loss)`, `aux_loss` the 0-d fp32 sum over memory layers of their weighted
    auxiliary losses for this forward (today the sub-key balance loss, `model.memory.balance_loss`;
    zero when off). The training loss is `loss + aux_loss`; `loss` stays the cross entropy.
  - `value_tables()`: every distinct memory value table by module name (PEER's down vectors
    included), for the optimizer's value group and sparse updates, and for column sharding, which
    swaps a table for its sharded twin with `model.set_submodule(name, sharded)`.
  - `side_layers()`: every `SideLayer` by module name (`blocks.1.engram`), for the optimizer's side
    tables group, usage metrics, inspection and the trainer's `adapt_to_tokenizer`.
  - incremental decoding: `model(idx, cache=model.new_cache(B, C), valid_BT=...)` appends the
    tokens to a `KVCache` (model/kv_cache.py) and returns their logits; attention reads the cached
    keys, memory layers and FFNs need no cache (they act per token); a side layer keeps its own
    decode state in the cache (`SideLayer.new_decode_state`). Eval mode only.

Shape legend (suffixes on tensor names):
  B  batch            T  sequence length      D  model dim       V  vocabulary size
  nh attention heads  hd head dim (D // nh)   F  FFN hidden dim
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import checked_once, require, require_one_of
from pkmlm.model import variants
from pkmlm.model.kv_cache import KVCache, LayerKV
from pkmlm.model.memory import MemoryConfig, ProductKeyMemory, ValueTables, _is_int, _is_number, new_value_tables
from pkmlm.model.variants import SideLayer

PosEmb = Literal["rope", "learned"]


def _rules_key(cfg: ModelConfig) -> str:
    """`ModelConfig.validate`'s memo key (`checked_once`): every field, a valid vocabulary size
    written as `valid`. No other rule reads it, so the config's check (with a placeholder size), the
    memory estimate's model and the model sized to its tokenizer check the config once per process."""
    vocab = cfg.vocab_size
    valid = _is_int(vocab) and vocab >= 1
    return repr(
        [
            (f.name, "valid" if f.name == "vocab_size" and valid else getattr(cfg, f.name))
            for f in dataclasses.fields(ModelConfig)
        ]
    )


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layers: int = 4
    dim: int = 256
    n_heads: int = 4
    ffn_mult: float = 4.0  # FFN hidden = int(ffn_mult * dim); 4 as in GPT-2 / the paper's baseline
    max_seq_len: int = 1024  # rope: cache length; learned: table size
    pos_emb: str = "rope"  # rope | learned
    rope_theta: float = 10000.0  # RoFormer's base
    tie_embeddings: bool = True  # lm_head shares the token embedding (GPT-2; saves V*D params)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @checked_once(key=_rules_key)  # pkmlm.config.validate, the memory estimate and Transformer ask
    def validate(self) -> None:
        """Raise `ConfigError` on the first bad value; nothing is allocated before it passes."""
        for name in ("vocab_size", "n_layers", "dim", "n_heads"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, f"model.{name}", value, "a positive integer")
        require(self.dim % self.n_heads == 0, "model.n_heads", self.n_heads, f"must divide model.dim={self.dim}")
        require_one_of("model.pos_emb", self.pos_emb, PosEmb)
        require(
            self.pos_emb != "rope" or (self.dim // self.n_heads) % 2 == 0,
            "model.n_heads",
            self.n_heads,
            f"rope needs an even head dim, but model.dim={self.dim} / model.n_heads={self.n_heads} "
            f"= {self.dim // self.n_heads}",
        )
        require(_is_number(self.ffn_mult) and self.ffn_mult > 0, "model.ffn_mult", self.ffn_mult, "a positive number")
        require(
            int(self.ffn_mult * self.dim) >= 1,
            "model.ffn_mult",
            self.ffn_mult,
            f"int(ffn_mult * model.dim={self.dim}) >= 1",
        )
        require(
            _is_int(self.max_seq_len) and self.max_seq_len >= 1,
            "model.max_seq_len",
            self.max_seq_len,
            "a positive integer",
        )
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            require(_is_number(value) and value > 0, f"model.{name}", value, "a positive number")
        p = self.dropout
        require(_is_number(p) and 0 <= p < 1, "model.dropout", p, "a probability in [0, 1)")
        # Called through the class so that a duck-typed config (an OmegaConf DictConfig) works too.
        MemoryConfig.validate(self.memory, prefix="model.memory", n_layers=self.n_layers)


# --- rotary position embedding (RoFormer, section 3.4.2) ------------------------------------------


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> Tuple[Tensor, Tensor]:
    """cos and sin, each `(max_seq_len, head_dim // 2)`: angle t * theta^(-2i/hd) for pair i."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x_BhTd: Tensor, cos_Tp: Tensor, sin_Tp: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + hd/2) of `(B, nh, T, hd)` by position-dependent angles.

    The "rotate half" pairing (GPT-NeoX): equivalent to RoFormer's interleaved pairs up to a fixed
    permutation of the head features, which the q/k projections absorb. Computed in fp32.
    """
    half = x_BhTd.shape[-1] // 2
    x1, x2 = x_BhTd.float()[..., :half], x_BhTd.float()[..., half:]
    out = torch.cat((x1 * cos_Tp - x2 * sin_Tp, x1 * sin_Tp + x2 * cos_Tp), dim=-1)
    return out.type_as(x_BhTd)


# --- the blocks -------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)  # a residual projection (scaled init)
        self.dropout = cfg.dropout

    def forward(self, x_BTD: Tensor, rope: Optional[Tuple[Tensor, Tensor]], kv: Optional[LayerKV] = None) -> Tensor:
        """`kv`: this layer's slice of a `KVCache` (incremental decoding): the new keys and values are
        written into it and attention reads all its slots under the cache's mask."""
        B, T, D = x_BTD.shape
        q_BTD, k_BTD, v_BTD = self.qkv(x_BTD).split(D, dim=-1)
        # (B, T, D) -> (B, nh, T, hd): one attention per head
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q_BTD, k_BTD, v_BTD))
        if rope is not None:
            cos_Tp, sin_Tp = rope
            q, k = apply_rope(q, cos_Tp, sin_Tp), apply_rope(k, cos_Tp, sin_Tp)
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hd)
        else:  # eval only (Transformer.forward): no dropout
            k, v = kv.update(k, v)  # (B, nh, L, hd): the cached slots and these
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv.cache.mask_B1TL)
        y_BTD = y.transpose(1, 2).reshape(B, T, D)  # re-assemble the heads side by side
        return F.dropout(self.out(y_BTD), p=self.dropout, training=self.training)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.ffn_mult * cfg.dim)
        self.up = nn.Linear(cfg.dim, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)  # a residual projection (scaled init)
        self.dropout = cfg.dropout

    def forward(self, x_BTD: Tensor) -> Tensor:
        h_BTF = F.gelu(self.up(x_BTD))
        return F.dropout(self.down(h_BTF), p=self.dropout, training=self.training)


class Block(nn.Module):
    """Pre-norm block: `x += attn(ln1(x)); x += mixer(ln2(x))`, the mixer being FFN, memory or both."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        mem = cfg.memory
        has_memory = layer in mem.layers
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn: Optional[FeedForward] = None
        if not has_memory or mem.placement == "parallel":
            self.ffn = FeedForward(cfg)
        self.memory: Optional[ProductKeyMemory] = None
        if has_memory:
            # With share_values the layer owns no value tables: the Transformer passes its pool.
            self.memory = ProductKeyMemory.from_config(cfg.dim, mem, owns_values=not mem.share_values)
        # A memory whose output is not D wide (values of v_dim != D, no gate) needs a projection
        # back to the residual stream.
        self.memory_proj: Optional[nn.Linear] = None
        if self.memory is not None and self.memory.out_dim != cfg.dim:
            self.memory_proj = nn.Linear(self.memory.out_dim, cfg.dim, bias=False)  # residual projection
        # The side layers of the variants that name this layer (`MemoryVariant.build_side`), each
        # under its variant's `side_name`; built last, so that a model without them is unchanged.
        self.side_names: Tuple[str, ...] = ()
        for variant in variants.side_variants():
            if layer in variant.side_layers(mem):
                self.add_module(variant.side_name, variant.build_side(cfg, layer))
                self.side_names += (variant.side_name,)

    def forward(
        self,
        x_BTD: Tensor,
        rope: Optional[Tuple[Tensor, Tensor]],
        tables: Optional[ValueTables] = None,
        return_aux: bool = False,
        kv: Optional[LayerKV] = None,
        idx_BT: Optional[Tensor] = None,
        valid_BT: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """`(x, aux)`: the block's output and, with `return_aux`, its memory's weighted auxiliary
        loss (else, or without a memory, None). `tables`: the shared value pool its memory reads
        (share_values), else None. `kv`: the attention's cache (incremental decoding). `idx_BT`:
        the token ids, which side layers read (`valid_BT`: the real ones, decoding with a cache)."""
        for name in self.side_names:  # before the attention, added to the residual stream
            side = getattr(self, name)
            if kv is None:
                x_BTD = x_BTD + side(x_BTD, idx_BT)
            else:
                x_BTD = x_BTD + side.decode(x_BTD, idx_BT, kv.side[name], valid_BT)
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), rope, kv)
        h_BTD = self.ln2(x_BTD)
        mixed_BTD = self.ffn(h_BTD) if self.ffn is not None else None
        aux = None
        if self.memory is not None:
            read = self.memory(h_BTD, tables, return_aux=return_aux)  # (B, T, out_dim) [, 0-d aux]
            if return_aux:
                read, aux = read
            if self.memory_proj is not None:
                # bf16 value tables read in bf16; outside autocast the fp32 projection needs fp32 input
                read = self.memory_proj(read.to(self.memory_proj.weight.dtype))
            mixed_BTD = read if mixed_BTD is None else mixed_BTD + read
        return x_BTD + mixed_BTD, aux


# --- the model ----------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Before any tensor exists. Through the class: `cfg` may also be an OmegaConf DictConfig
        # of this schema, which has the fields but not the methods.
        ModelConfig.validate(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # model.memory.share_values: one pool of value tables (PEER: values and down vectors),
        # owned here and passed explicitly to every memory layer at each call (each layer keeps
        # its own query network, keys and gate); registered once, so saved, counted and optimised once.
        self.shared_values: Optional[nn.Module] = None
        self.shared_down: Optional[nn.Module] = None
        mem = cfg.memory
        if mem.share_values and len(mem.layers) > 0:
            self.shared_values, self.shared_down = new_value_tables(
                mem.n_keys, mem.v_dim or cfg.dim, variants.down_dim(mem, cfg.dim), mem.values_dtype
            )
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, two uses (GPT-2)
        if cfg.pos_emb == "rope":
            cos, sin = rope_cache(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
            # Not persistent: derived from the config, so checkpoints need not carry them.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) for linears and embeddings, 0.02/sqrt(2 * n_layers) for the
        projections that write into the residual stream (Radford et al. 2019, section 2.3: scale
        residual weights by 1/sqrt(N) for N residual layers; two per block). Memory layers keep
        their own init (uniform keys, N(0, 1/v_dim) values, PyTorch's default query network)."""
        own_init = [*self.memory_layers().values(), *self.side_layers().values()]
        memory_modules = {id(m) for memory in own_init for m in memory.modules()}
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for side in self.side_layers().values():  # their own init, given the residual projections' std
            side.reset_parameters(residual_std)
        for name, module in self.named_modules():
            if id(module) in memory_modules:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.endswith(("attn.out", "ffn.down", "memory_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if residual else 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(
        self,
        idx_BT: Tensor,
        targets_BT: Optional[Tensor] = None,
        *,
        return_aux: bool = False,
        cache: Optional[KVCache] = None,
        valid_BT: Optional[Tensor] = None,
    ) -> Union[Tuple[Tensor, Optional[Tensor]], Tuple[Tensor, Optional[Tensor], Tensor]]:
        """Token ids `(B, T)` -> logits `(B, T, V)` and, given targets, the mean cross entropy
        (fp32, positions with target -100 ignored). With `return_aux=True` a third element: the
        auxiliary loss of this forward, a 0-d fp32 tensor, the sum over memory layers of
        `model.memory.balance_loss` x their sub-key balance loss (zero without memory or with a
        coefficient of 0). It is not in `loss`: the training loss is `loss + aux_loss`.

        `cache` (a `KVCache` from `new_cache`, eval mode only): the tokens continue the cached rows
        instead of starting at position 0; `valid_BT` (bool, default all true) marks the real tokens,
        False for left padding (model/kv_cache.py). No row may pass `model.max_seq_len` real tokens."""
        B, T = idx_BT.shape
        if cache is None and T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "feed shorter sequences or build the model with a larger max_seq_len"
            )
        x_BTD = self.tok_emb(idx_BT)
        if cache is None:
            positions = torch.arange(T, device=idx_BT.device)  # (T,), broadcast over B
        else:
            positions = self._cached_positions(idx_BT, cache, valid_BT)  # (B, T)
        rope = None
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(positions)
        elif cache is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        else:  # each row its own angles: (B, 1, T, hd/2), broadcast over heads
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        x_BTD = self.drop(x_BTD)
        shared = self.shared_tables()
        aux_loss = torch.zeros((), dtype=torch.float32, device=idx_BT.device)
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            x_BTD, aux = block(
                x_BTD, rope, shared if block.memory is not None else None, return_aux, kv, idx_BT, valid_BT
            )
            if aux is not None:
                aux_loss = aux_loss + aux
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        loss = None
        if targets_BT is not None:
            # Flatten (B, T) into one batch of B*T predictions; fp32 for the log-softmax.
            loss = F.cross_entropy(logits_BTV.float().view(B * T, -1), targets_BT.reshape(B * T), ignore_index=-100)
        if return_aux:
            return logits_BTV, loss, aux_loss
        return logits_BTV, loss

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty `KVCache` for `batch` rows of up to `capacity` slots (padding included), with
        each side layer's decode state."""
        cache = KVCache(self.cfg.n_layers, batch, capacity, device=self.tok_emb.weight.device)
        for i, block in enumerate(self.blocks):
            for name in block.side_names:
                cache.layers[i].side[name] = getattr(block, name).new_decode_state(batch)
        return cache

    def _cached_positions(self, idx_BT: Tensor, cache: KVCache, valid_BT: Optional[Tensor]) -> Tensor:
        """Positions `(B, T)` of tokens appended to `cache` (see `forward`); refusals first."""
        if self.training:
            # A BatchNorm query norm in training mode mixes the tokens of a batch (future ones
            # included), dropout would differ from step to step: decoding is an eval-mode computation.
            raise ValueError("decoding with a KV cache needs eval mode: call model.eval() first")
        if valid_BT is None:
            valid_BT = torch.ones(idx_BT.shape, dtype=torch.bool, device=idx_BT.device)
        longest = int((cache.seen_B + valid_BT.sum(1)).max())
        if longest > self.cfg.max_seq_len:
            raise ValueError(
                f"a row would reach {longest} tokens, beyond model.max_seq_len={self.cfg.max_seq_len}; "
                "slide the window (pkmlm.generate does) or build the model with a larger max_seq_len"
            )
        return cache.extend(valid_BT)

    def aux_loss_name(self) -> Optional[str]:
        """The name the training loop logs this model's auxiliary loss under (`return_aux=True`),
        e.g. `balance_loss` (UltraMemV2's); None when no memory layer computes one. Several kinds
        of auxiliary loss are summed into one term, `aux_loss`."""
        names = variants.aux_names(list(self.memory_layers().values()))
        return None if not names else names[0] if len(names) == 1 else "aux_loss"

    def memory_layers(self) -> Dict[int, ProductKeyMemory]:
        """Transformer layer index -> its memory, in layer order."""
        return {i: block.memory for i, block in enumerate(self.blocks) if block.memory is not None}

    def side_layers(self) -> Dict[str, SideLayer]:
        """Every side layer (`MemoryVariant.build_side`) by module name, e.g. `blocks.1.engram`, in layer order."""
        return {f"blocks.{i}.{name}": getattr(b, name) for i, b in enumerate(self.blocks) for name in b.side_names}

    def shared_tables(self) -> Optional[ValueTables]:
        """The value pool every memory layer reads with `share_values`, else None."""
        if self.shared_values is None:
            return None
        return ValueTables(self.shared_values, self.shared_down)

    def tables_of(self, layer: int) -> ValueTables:
        """The value tables the memory of transformer layer `layer` reads (its own or the pool)."""
        memory = self.memory_layers()[layer]
        return memory.own_tables() if memory.owns_values else self.shared_tables()

    def value_tables(self) -> Dict[str, nn.Module]:
        """Every distinct value table (values, and PEER's down vectors) by its module name, e.g.
        `blocks.2.memory.values`, `blocks.2.memory.down`, or `shared_values` / `shared_down` for a
        pool: the optimizer's value group and column sharding take them from here."""
        tables: Dict[str, nn.Module] = {}
        owners = [("", self.shared_tables())] if self.shared_values is not None else []
        owners += [(f"blocks.{i}.memory.", m.own_tables()) for i, m in self.memory_layers().items() if m.owns_values]
        for prefix, pool in owners:
            for name, table in zip(("values", "down"), pool):
                if table is not None:
                    tables[(prefix or "shared_") + name] = table
        return tables

    def count_parameters(self) -> Dict[str, int]:
        """Parameter counts.

        total          unique parameters (a tied embedding counts once)
        memory_values  all memory tables: the value tables (PEER: up and down vectors) and the side
                       layers' tables (Engram's hashed rows)
        side_tables    the side layers' part of memory_values
        active         what one token touches: total - memory_values + the value rows one token
                       reads, H * K * v_dim per memory layer (PEER: H * K * (v_dim + dim)), + the
                       table entries a side layer reads (`SideLayer.count_parameters`)
        embedding      token + learned position embeddings
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        side = [layer.count_parameters() for layer in self.side_layers().values()]
        side_tables = sum(c["tables"] for c in side)
        # Each table once (a pool counts once); a DTensor's numel is the whole table's.
        memory_values = sum(t.weight.numel() for t in self.value_tables().values()) + side_tables
        read_rows = sum(m.read_params() for m in self.memory_layers().values())
        read_rows += sum(c["active"] - (c["total"] - c["tables"]) for c in side)
        embedding = self.tok_emb.weight.numel()
        if self.pos_emb is not None:
            embedding += self.pos_emb.weight.numel()
        return {
            "total": total,
            "memory_values": memory_values,
            "side_tables": side_tables,
            "active": total - memory_values + read_rows,
            "embedding": embedding,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Active training FLOPs per token: 6 * N + 12 * n_layers * dim * seq_len.

        The 6 * N term (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B; nanoGPT
        `estimate_mfu`): every weight that a token multiplies costs 2 FLOPs forward (multiply, add)
        and 4 backward (gradients of its input and of itself). N is the active non-embedding
        parameter count, i.e. what the token really multiplies:
          - attention q, k, v, out projections: 4 * D^2 per layer; FFN: 2 * D * F per layer;
          - memory query network: D * H * Q (+ bias and norms, negligible);
          - what a memory variant adds (`ProductKeyMemory.macs`, `read_params`), e.g. Memory+'s
            gate_proj D * v_dim and out_proj v_dim * D (dense weights);
          - memory key scores: each token scores every sub-key of every half and head once,
            H * 2 * S * (Q/2) = H * S * Q multiply-adds, exactly the key parameter count
            (2 * H * S * Q FLOPs forward; the backward gives q and the keys their gradients);
          - memory value read: H * K * v_dim multiply-adds (the selected rows only, never the
            whole table); the backward gives the rows and the weights their gradients; a variant
            that reads a second per-slot vector adds its columns (PEER: H * K * D);
          - the lm_head: D * V (the tied embedding's only matmul; a lookup costs nothing);
          - a side layer: its own count (`SideLayer.flops_per_token`) in place of 6 x its active
            parameters (Engram: its projections, gate and convolution; its lookup multiplies nothing).
          Not counted: the top-K selections and K*K candidate sums (no multiplies, O(H*K^2)),
          softmaxes, norms and residual adds, as in the references.
        The attention term: QK^T and AV each cost 2 * T * D FLOPs forward per token and layer,
        times 3 for forward + backward: 12 * n_layers * D * T (PaLM appendix B; the causal mask's
        skipped half is counted, as in the references).
        """
        counts = self.count_parameters()
        non_embedding = counts["active"] - counts["embedding"]
        if self.cfg.tie_embeddings:
            non_embedding += self.lm_head.weight.numel()  # the tied table is also the lm_head matmul
        attention = 12 * self.cfg.n_layers * self.cfg.dim * seq_len
        sides = self.side_layers().values()
        non_embedding -= sum(layer.count_parameters()["active"] for layer in sides)
        return float(6 * non_embedding + attention + sum(layer.flops_per_token() for layer in sides))
