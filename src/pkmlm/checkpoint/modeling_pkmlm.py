"""A pkmlm language model for Hugging Face transformers: `PkmlmConfig` and `PkmlmForCausalLM`.

`pkmlm-export RUN --out DIR --format hf` copies this file into DIR, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads the model without pkmlm: the file needs only torch and transformers 5 (tested with 5.25). It re-implements,
for inference and fine-tuning, pkmlm's decoder-only transformer (src/pkmlm/model/transformer.py)
and every product-key memory variant (src/pkmlm/model/memory.py: query BatchNorm / LayerNorm /
none, qk norm, Memory+ gate, PEER experts, value pools shared across layers, parallel or replace
placement, value dims other than the model's, bfloat16 tables), with the same parameter names, so
DIR/model.safetensors is the very file pkmlm reads. The memory's read is the torch path of pkmlm
(`embedding_bag`); pkmlm's triton kernels and column-sharded tables are not here, nor the sub-key
balance loss (a training-time auxiliary loss). Logits equal pkmlm's (tests/e2e/test_hf_export.py).

Generation: `model.generate` with transformers' `DynamicCache`; left-padded batches through the
`attention_mask` (positions count the real tokens of a row). Memory layers act on each token alone
and need no cache; their BatchNorm query norm (the paper's) is causal only in eval mode, which
`from_pretrained` sets.

Shape legend: B batch, T new tokens, L cached + new tokens, D model dim, V vocabulary,
H memory heads, K slots read per head, S sub-keys per half, P half a query, nh / hd attention heads / head dim.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers renamed `past_key_values` to `cache` (model inputs and outputs) during 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# pkmlm's MemoryConfig defaults, for a config.json that leaves a field out.
MEMORY_DEFAULTS = dict(
    layers=[],
    placement="replace",
    n_keys=512,
    heads=4,
    knn=32,
    k_dim=512,
    v_dim=None,
    query_norm="batchnorm",
    input_dropout=0.0,
    query_dropout=0.0,
    value_dropout=0.0,
    values_dtype="float32",
    retrieval_precision="fp32",
    gate="none",
    qk_norm=False,
    values_kind="embedding",
    peer_activation="gelu",
    share_values=False,
)
MODEL_DEFAULTS = dict(
    vocab_size=8192,
    n_layers=4,
    dim=256,
    n_heads=4,
    ffn_mult=4.0,
    max_seq_len=1024,
    pos_emb="rope",
    rope_theta=10000.0,
    tie_embeddings=True,
    dropout=0.0,
    norm_eps=1e-5,
)
GATES = {"silu": F.silu, "sigmoid": torch.sigmoid}
PEER_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
VALUES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PkmlmConfig(PretrainedConfig):
    """`model_config`: pkmlm's model config as a dict (its ModelConfig, memory included), as
    pkmlm-export writes it; the usual transformers names (hidden_size, ...) are derived from it."""

    model_type = "pkmlm"

    def __init__(self, model_config: Optional[dict] = None, use_cache: bool = True, **kwargs):
        model = {**MODEL_DEFAULTS, **(model_config or {})}
        model["memory"] = {**MEMORY_DEFAULTS, **(model.get("memory") or {})}
        kwargs.setdefault("tie_word_embeddings", bool(model["tie_embeddings"]))
        super().__init__(**kwargs)
        self.model_config = model
        self.use_cache = use_cache
        self.vocab_size = model["vocab_size"]
        self.hidden_size = model["dim"]
        self.num_hidden_layers = model["n_layers"]
        self.num_attention_heads = model["n_heads"]
        self.max_position_embeddings = model["max_seq_len"]


# --- positions -------------------------------------------------------------------------------------


def rope_angles(positions_BT: Tensor, head_dim: int, theta: float) -> Tuple[Tensor, Tensor]:
    """cos and sin `(B, 1, T, hd/2)` of angle t * theta^(-2i/hd) (pkmlm's `rope_cache`, same fp32 ops)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_BT.device) / head_dim)
    angles = positions_BT.float()[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x_BhTd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + hd/2) ("rotate half", GPT-NeoX), in fp32."""
    half = x_BhTd.shape[-1] // 2
    x1, x2 = x_BhTd.float()[..., :half], x_BhTd.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x_BhTd)


# --- the memory -----------------------------------------------------------------------------------


def eligible_rank_pairs(knn: int, device) -> Tuple[Tensor, Tensor]:
    """Rank pairs (a, b) with (a + 1) * (b + 1) <= knn: the only ones that can reach the top-K."""
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    return (
        torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device),
        torch.tensor([b for _, b in pairs], dtype=torch.long, device=device),
    )


def new_value_tables(n_keys: int, dim: int, v_dim: int, values_kind: str, values_dtype: str):
    dtype = VALUES_DTYPES[values_dtype]
    values = nn.EmbeddingBag(n_keys**2, v_dim, mode="sum", dtype=dtype)
    down = nn.EmbeddingBag(n_keys**2, dim, mode="sum", dtype=dtype) if values_kind == "peer" else None
    return values, down


def read_values(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor) -> Tensor:
    """sum_r weights[n, r] * values[indices[n, r]] `(N, V)`: pkmlm's torch read path."""
    weights_NR = weights_NR.to(values_MV.dtype)
    if values_MV.dtype == torch.float32 or values_MV.device.type == "cpu":
        return F.embedding_bag(indices_NR, values_MV, per_sample_weights=weights_NR, mode="sum")
    rows_NRV = F.embedding(indices_NR, values_MV)
    return torch.bmm(weights_NR.unsqueeze(1), rows_NRV).squeeze(1)


class ProductKeyMemory(nn.Module):
    """Multi-head product-key memory (Lample et al. 2019) with pkmlm's variants (module docstring)."""

    def __init__(self, dim: int, mem: dict, owns_values: bool):
        super().__init__()
        self.dim, self.n_keys, self.heads, self.knn, self.k_dim = (
            dim,
            mem["n_keys"],
            mem["heads"],
            mem["knn"],
            mem["k_dim"],
        )
        self.v_dim = mem["v_dim"] or dim
        self.gate, self.values_kind, self.peer_activation = mem["gate"], mem["values_kind"], mem["peer_activation"]
        self.retrieval_precision = mem["retrieval_precision"]
        self.input_dropout, self.query_dropout = mem["input_dropout"], mem["query_dropout"]
        self.value_dropout = mem["value_dropout"]
        H, Q, P = self.heads, self.k_dim, self.k_dim // 2
        self.query_proj = nn.Linear(dim, H * Q)
        self.query_norm_layer: Optional[nn.Module] = None
        if mem["query_norm"] == "batchnorm":
            self.query_norm_layer = nn.BatchNorm1d(H * Q)
        elif mem["query_norm"] == "layernorm":
            self.query_norm_layer = nn.GroupNorm(H, H * Q)
        self.query_half_norm = nn.LayerNorm(P, bias=False) if mem["qk_norm"] else None
        self.key_norm = nn.LayerNorm(P, bias=False) if mem["qk_norm"] else None
        self.keys = nn.Parameter(torch.empty(H, 2, self.n_keys, P))
        self.values: Optional[nn.Module] = None
        self.down: Optional[nn.Module] = None
        if owns_values:
            self.values, self.down = new_value_tables(
                self.n_keys, dim, self.v_dim, self.values_kind, mem["values_dtype"]
            )
        self.gate_proj: Optional[nn.Linear] = None
        self.out_proj: Optional[nn.Linear] = None
        if self.gate != "none":
            self.gate_proj = nn.Linear(dim, self.v_dim)
            self.out_proj = nn.Linear(self.v_dim, dim, bias=False)
        self.out_dim = dim if self.gate != "none" else self.v_dim

    def _lookup(self, x_ND: Tensor) -> Tuple[Tensor, Tensor]:
        """Weights (fp32) and slot ids `(N, H, K)` of the exact top-K over the S*S product keys."""
        fp32 = self.retrieval_precision == "fp32"
        with torch.autocast(x_ND.device.type, enabled=False) if fp32 else _nullcontext():
            x = x_ND.float() if fp32 else x_ND
            q_NF = self.query_proj(x)
            if self.query_norm_layer is not None:
                q_NF = self.query_norm_layer(q_NF)
            q_NHQ = q_NF.view(-1, self.heads, self.k_dim)
            P = self.k_dim // 2
            if self.query_half_norm is not None:
                q_NHQ = self.query_half_norm(q_NHQ.view(-1, self.heads, 2, P)).view(-1, self.heads, self.k_dim)
            q_NHQ = F.dropout(q_NHQ, p=self.query_dropout, training=self.training)
            keys_H2SP = self.keys if self.key_norm is None else self.key_norm(self.keys)
            # both halves of every head in one batched matmul, as pkmlm computes them
            s_NH2S = torch.einsum("nhcp,hcsp->nhcs", q_NHQ.view(*q_NHQ.shape[:-1], 2, P), keys_H2SP)
        K, S = self.knn, self.n_keys
        top_NH2K, ids_NH2K = s_NH2S.topk(K, dim=-1)
        top1_NHK, top2_NHK = top_NH2K[:, :, 0].float(), top_NH2K[:, :, 1].float()
        i_NHK, j_NHK = ids_NH2K[:, :, 0], ids_NH2K[:, :, 1]
        pair_a, pair_b = eligible_rank_pairs(K, x_ND.device)
        with torch.no_grad():
            cand_NHC = top1_NHK.index_select(-1, pair_a) + top2_NHK.index_select(-1, pair_b)
            best_NHK = cand_NHC.topk(K, dim=-1).indices
        a_NHK, b_NHK = pair_a[best_NHK], pair_b[best_NHK]
        scores_NHK = top1_NHK.gather(-1, a_NHK) + top2_NHK.gather(-1, b_NHK)
        slot_NHK = i_NHK.gather(-1, a_NHK) * S + j_NHK.gather(-1, b_NHK)
        return F.softmax(scores_NHK.float(), dim=-1), slot_NHK

    def forward(self, x: Tensor, tables: Optional[Tuple[nn.Module, Optional[nn.Module]]] = None) -> Tensor:
        values, down = tables if tables is not None else (self.values, self.down)
        lead_shape = x.shape[:-1]
        x_ND = F.dropout(x.reshape(-1, self.dim), p=self.input_dropout, training=self.training)
        weights_NHK, indices_NHK = self._lookup(x_ND)
        indices_NR, weights_NR = indices_NHK.flatten(1), weights_NHK.flatten(1)
        if down is not None:  # PEER: slot i is the expert act(x . u_i) * v_i
            rows_NRD = F.embedding(indices_NR, down.weight)
            h_NR = torch.bmm(rows_NRD, x_ND.to(rows_NRD.dtype).unsqueeze(-1)).squeeze(-1).float()
            weights_NR = weights_NR * PEER_ACTIVATIONS[self.peer_activation](h_NR)
        out_NV = read_values(values.weight, indices_NR, weights_NR)
        if self.gate_proj is not None and self.out_proj is not None:  # Memory+: out_proj(read * act(gate_proj(x)))
            gate_NV = GATES[self.gate](self.gate_proj(x_ND))
            out_NV = self.out_proj(out_NV.to(gate_NV.dtype) * gate_NV)
        out_NV = F.dropout(out_NV, p=self.value_dropout, training=self.training)
        return out_NV.view(*lead_shape, self.out_dim)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- the transformer ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, model: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = model["n_heads"], model["dim"] // model["n_heads"]
        self.qkv = nn.Linear(model["dim"], 3 * model["dim"], bias=False)
        self.out = nn.Linear(model["dim"], model["dim"], bias=False)
        self.dropout = model["dropout"]

    def forward(self, x_BTD: Tensor, rope, cache, mask: Optional[Tensor]) -> Tensor:
        """`mask`: None for plain causal attention over this call's tokens, else `(B, 1, T, L)` (bool)."""
        B, T, D = x_BTD.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x_BTD).split(D, dim=-1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y_BTD = y.transpose(1, 2).reshape(B, T, D)
        return F.dropout(self.out(y_BTD), p=self.dropout, training=self.training)


class FeedForward(nn.Module):
    def __init__(self, model: dict):
        super().__init__()
        hidden = int(model["ffn_mult"] * model["dim"])
        self.up = nn.Linear(model["dim"], hidden, bias=False)
        self.down = nn.Linear(hidden, model["dim"], bias=False)
        self.dropout = model["dropout"]

    def forward(self, x_BTD: Tensor) -> Tensor:
        return F.dropout(self.down(F.gelu(self.up(x_BTD))), p=self.dropout, training=self.training)


class Block(nn.Module):
    """Pre-norm: `x += attn(ln1(x)); x += mixer(ln2(x))`, the mixer an FFN, a memory or both summed."""

    def __init__(self, model: dict, layer_idx: int):
        super().__init__()
        mem, dim = model["memory"], model["dim"]
        has_memory = layer_idx in mem["layers"]
        self.ln1 = nn.LayerNorm(dim, eps=model["norm_eps"])
        self.attn = CausalSelfAttention(model, layer_idx)
        self.ln2 = nn.LayerNorm(dim, eps=model["norm_eps"])
        self.ffn = FeedForward(model) if not has_memory or mem["placement"] == "parallel" else None
        self.memory = ProductKeyMemory(dim, mem, owns_values=not mem["share_values"]) if has_memory else None
        self.memory_proj = None
        if self.memory is not None and self.memory.out_dim != dim:
            self.memory_proj = nn.Linear(self.memory.out_dim, dim, bias=False)

    def forward(self, x_BTD: Tensor, rope, cache, mask, tables) -> Tensor:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), rope, cache, mask)
        h_BTD = self.ln2(x_BTD)
        mixed_BTD = self.ffn(h_BTD) if self.ffn is not None else None
        if self.memory is not None:
            read = self.memory(h_BTD, tables)
            if self.memory_proj is not None:
                read = self.memory_proj(read)
            mixed_BTD = read if mixed_BTD is None else mixed_BTD + read
        return x_BTD + mixed_BTD


class PkmlmPreTrainedModel(PreTrainedModel):
    config_class = PkmlmConfig
    base_model_prefix = "pkmlm"
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights only (from_pretrained loads every one): pkmlm's init, roughly (N(0, 0.02)
        linears and embeddings, N(0, 1/V) value rows, uniform keys)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.EmbeddingBag):
            nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, ProductKeyMemory):
            bound = 1.0 / math.sqrt(module.k_dim // 2)
            nn.init.uniform_(module.keys, -bound, bound)


class PkmlmForCausalLM(PkmlmPreTrainedModel, GenerationMixin):
    # The tied embedding is stored once, under `lm_head.weight` (safetensors keeps one name);
    # transformers ties symmetrically when one side is missing.
    _tied_weights_keys = {"lm_head.weight": "tok_emb.weight"}

    def __init__(self, config: PkmlmConfig):
        super().__init__(config)
        model = config.model_config
        mem = model["memory"]
        self.tok_emb = nn.Embedding(model["vocab_size"], model["dim"])
        self.pos_emb = nn.Embedding(model["max_seq_len"], model["dim"]) if model["pos_emb"] == "learned" else None
        self.drop = nn.Dropout(model["dropout"])
        self.shared_values = self.shared_down = None
        if mem["share_values"] and mem["layers"]:
            self.shared_values, self.shared_down = new_value_tables(
                mem["n_keys"], model["dim"], mem["v_dim"] or model["dim"], mem["values_kind"], mem["values_dtype"]
            )
        self.blocks = nn.ModuleList(Block(model, i) for i in range(model["n_layers"]))
        self.ln_f = nn.LayerNorm(model["dim"], eps=model["norm_eps"])
        self.lm_head = nn.Linear(model["dim"], model["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.tok_emb = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache=None,
        past_key_values=None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Logits `(B, T, V)` of `input_ids` after the cached tokens; loss of `labels` (shifted inside,
        -100 ignored) when given. `attention_mask` `(B, L)`: 0 for left padding."""
        model = self.config.model_config
        B, T = input_ids.shape
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        L = past + T
        device = input_ids.device
        if attention_mask is None:
            valid_BL = torch.ones((B, L), dtype=torch.bool, device=device)
        else:
            valid_BL = attention_mask[:, -L:].bool()
        if position_ids is None:  # each row counts its real tokens (left padding shifts nothing)
            position_ids = (valid_BL.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if int(position_ids.max()) >= model["max_seq_len"]:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond the model's context of {model['max_seq_len']} "
                "tokens (max_position_embeddings); shorten the input or max_new_tokens"
            )
        mask = None
        if past > 0 or not bool(valid_BL.all()):
            slot_T = torch.arange(past, L, device=device)
            slot_L = torch.arange(L, device=device)
            # a query reads the real tokens up to its own slot; a padding slot reads itself (no NaN)
            mask = ((slot_L[None] <= slot_T[:, None])[None] & valid_BL[:, None]) | (slot_L[None] == slot_T[:, None])
            mask = mask[:, None]  # (B, 1, T, L)
        x_BTD = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(position_ids)
        else:
            rope = rope_angles(position_ids, model["dim"] // model["n_heads"], model["rope_theta"])
        x_BTD = self.drop(x_BTD)
        tables = (self.shared_values, self.shared_down) if self.shared_values is not None else None
        for block in self.blocks:
            x_BTD = block(x_BTD, rope, cache, mask, tables)
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits_BTV[:, :-1].float().reshape(-1, logits_BTV.shape[-1]),
                labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100,
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits_BTV, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()
