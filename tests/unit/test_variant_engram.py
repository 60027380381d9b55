"""The Engram layer (pkmlm/model/variants/engram.py) against a written-out loop, its document boundaries and
causality, the tokenizer compression and its saved mapping, sparse row updates and usage metrics."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from tokenizers import Tokenizer, models

from pkmlm.errors import ConfigError, DataError
from pkmlm.metrics.table_usage import TableUsage
from pkmlm.model.variants.engram import (
    Compression,
    EngramConfig,
    EngramLayer,
    build_compression,
    canonical_text,
    collision_rates,
    hash_multipliers,
    is_prime,
    load_compression,
    most_read_rows,
    plan_table_sizes,
    save_compression,
)
from pkmlm.optim.lazy_adam import LazyAdam

EOT = 0
VOCAB = 40
DIM = 8


def _layer(seed: int = 0, **overrides) -> EngramLayer:
    """A small layer with every parameter random (the convolution's taps and the norms' gains
    included, which init leaves at 0 and 1), over a random many-to-one compression of VOCAB ids."""
    cfg = EngramConfig(**{"layers": [0, 2], "heads": 2, "embed_dim": 8, "table_size": 13, **overrides})
    cfg.validate(n_layers=4)
    g = torch.Generator().manual_seed(seed)
    canonical = torch.randint(0, 25, (VOCAB,), generator=g)
    canonical[EOT] = 25  # the end-of-text token has a canonical id of its own
    compression = Compression(canonical, 26, "test")
    layer = EngramLayer(DIM, cfg, 2, VOCAB, plan_table_sizes(cfg)[2])
    layer.install_compression(compression, EOT)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 2 else 1.0))
    return layer


def _tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, VOCAB, (B, T), generator=g)
    idx[0, 5] = EOT  # documents end mid-row, twice in a row, and at a row's last position
    idx[1, 3] = idx[1, 4] = EOT
    idx[1, T - 1] = EOT
    return idx


def _naive(layer: EngramLayer, h, idx):
    """Rows `(B, T, R)` and output `(B, T, D)` by a loop over rows, positions, orders and heads."""
    B, T = idx.shape
    N, H, K, dil = layer.max_ngram, layer.heads, layer.kernel_size, layer.dilation
    canon, mult = layer.canonical_ids.tolist(), layer.multipliers.tolist()
    sizes = layer.sizes.tolist()
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    W = layer.tables.weight

    def rms(x, norm):
        return x / torch.sqrt((x * x).mean() + torch.finfo(x.dtype).eps) * norm.weight

    rows = torch.zeros(B, T, (N - 1) * H, dtype=torch.int64)
    v = torch.zeros(B, T, layer.dim)
    for b in range(B):
        start = 0
        for t in range(T):
            if t > 0 and idx[b, t - 1] == EOT:
                start = t
            grams = [canon[idx[b, t - k]] if t - k >= start else layer.pad_id for k in range(N)]
            mix = grams[0] * mult[0]
            for n in range(2, N + 1):
                mix ^= grams[n - 1] * mult[n - 1]
                for j in range(H):
                    r = (n - 2) * H + j
                    rows[b, t, r] = mix % sizes[r] + offsets[r]
            e = torch.cat([W[rows[b, t, r]] for r in range(rows.shape[-1])])
            k_vec, v_vec = layer.key_proj.weight @ e, layer.value_proj.weight @ e
            logit = (rms(h[b, t], layer.norm_h) * rms(k_vec, layer.norm_k)).sum() / math.sqrt(layer.dim)
            if layer.gate_signed_sqrt:
                logit = math.copysign(math.sqrt(max(abs(float(logit)), 1e-6)), float(logit))
            v[b, t] = torch.sigmoid(torch.as_tensor(logit)) * v_vec
    out = torch.zeros_like(v)
    for b in range(B):
        start = 0
        for t in range(T):
            if t > 0 and idx[b, t - 1] == EOT:
                start = t
            acc = torch.zeros(layer.dim)
            for j in range(K):
                if t - j * dil >= start:
                    acc = acc + layer.conv_weight[:, j] * rms(v[b, t - j * dil], layer.norm_conv)
            out[b, t] = v[b, t] + torch.nn.functional.silu(acc)
    return rows, out


@pytest.mark.parametrize("signed_sqrt", [False, True])
def test_layer_matches_a_written_out_loop(signed_sqrt):
    layer = _layer(gate_signed_sqrt=signed_sqrt)
    idx = _tokens(2, 24)
    h = torch.randn(2, 24, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rows_ref, out_ref = _naive(layer, h, idx)
        assert torch.equal(layer.rows(idx), rows_ref)  # the hashes exactly
        torch.testing.assert_close(layer(h, idx), out_ref, rtol=1e-5, atol=1e-5)


def test_no_ngram_or_convolution_crosses_a_document_boundary():
    """The tokens after an end-of-text token read the same rows, and (with the same hidden states)
    give the same output, as the same tokens at a window start."""
    layer = _layer()
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(1, VOCAB, (1, 12), generator=g)
    before = torch.randint(1, VOCAB, (1, 9), generator=g)
    after_eot = torch.cat([before, torch.tensor([[EOT]]), doc], dim=1)  # 10 tokens, then the document
    h_doc = torch.randn(1, 12, DIM, generator=g)
    h = torch.cat([torch.randn(1, 10, DIM, generator=g), h_doc], dim=1)
    with torch.no_grad():
        assert torch.equal(layer.rows(after_eot)[:, 10:], layer.rows(doc))
        torch.testing.assert_close(layer(h, after_eot)[:, 10:], layer(h_doc, doc), rtol=0, atol=1e-6)
        # and the boundary matters: without the end-of-text token the rows differ
        no_eot = after_eot.clone()
        no_eot[0, 9] = 1
        assert not torch.equal(layer.rows(no_eot)[:, 10:], layer.rows(doc))


def test_output_at_t_ignores_later_tokens_and_states():
    layer = _layer()
    idx, h = _tokens(2, 20), torch.randn(2, 20, DIM)
    idx2, h2 = idx.clone(), h.clone()
    t = 11
    idx2[:, t + 1 :] = torch.randint(0, VOCAB, idx2[:, t + 1 :].shape)  # end-of-text tokens included
    h2[:, t + 1 :] = torch.randn_like(h2[:, t + 1 :])
    with torch.no_grad():
        torch.testing.assert_close(layer(h, idx)[:, : t + 1], layer(h2, idx2)[:, : t + 1], rtol=0, atol=0)


def test_tables_take_sparse_row_gradients_and_lazy_adam_moves_only_the_rows_read():
    layer = _layer()
    layer.sparse_grad = True
    idx, h = _tokens(2, 16), torch.randn(2, 16, DIM)
    layer(h, idx).square().sum().backward()
    grad = layer.tables.weight.grad
    assert grad.is_sparse
    read = torch.unique(layer.rows(idx))
    assert torch.equal(torch.unique(grad.coalesce().indices()[0]), read)
    before = layer.tables.weight.detach().clone()
    LazyAdam(layer.table_parameters(), lr=0.1, use_triton=False).step()
    moved = (layer.tables.weight.detach() != before).any(1).nonzero().flatten()
    assert torch.equal(moved, read)
    assert layer.table_parameters() == [layer.tables.weight]


def test_table_sizes_are_distinct_primes_and_multipliers_odd_and_seeded():
    cfg = EngramConfig(layers=[3, 1], max_ngram=4, heads=3, embed_dim=6, table_size=100)
    sizes = plan_table_sizes(cfg)
    flat = sizes[1] + sizes[3]
    assert set(sizes) == {1, 3} and len(sizes[1]) == 3 * 3
    assert all(is_prime(p) and p >= 100 for p in flat) and len(set(flat)) == len(flat)
    assert flat[0] == 101 and not any(is_prime(n) for n in (1, 0, 91, 100))
    m = hash_multipliers(0, 1, 1000, 4)
    assert m.dtype == torch.int64 and bool((m % 2 == 1).all()) and bool((m * 1000 < 2**63 - 1).all())
    assert torch.equal(m, hash_multipliers(0, 1, 1000, 4))
    assert not torch.equal(m, hash_multipliers(0, 2, 1000, 4)) and not torch.equal(m, hash_multipliers(1, 1, 1000, 4))


def test_counts_and_flops():
    layer = _layer()
    counts = layer.count_parameters()
    R, E = layer.rows_per_token, layer.row_dim
    assert counts["total"] == sum(p.numel() for p in layer.parameters())
    assert counts["tables"] == sum(layer.sizes.tolist()) * E
    assert counts["active"] == counts["total"] - counts["tables"] + R * E
    assert layer.flops_per_token() == 6 * (2 * R * E * DIM + DIM + layer.kernel_size * DIM)


@pytest.mark.parametrize("init", ["residual", "maxtext"])  # zero_tables: both sides zero (the next test)
def test_fresh_layer_starts_as_the_gated_value_alone(init):
    cfg = EngramConfig(layers=[0], heads=2, embed_dim=8, table_size=13, init=init)
    layer = EngramLayer(DIM, cfg, 0, VOCAB, plan_table_sizes(cfg)[0])
    assert not layer.conv_weight.any()
    idx, h = _tokens(2, 10), torch.randn(2, 10, DIM)
    e = layer.lookup(layer.rows(idx))
    expected = layer.gate(h, layer.key_proj(e)).unsqueeze(-1) * layer.value_proj(e)
    torch.testing.assert_close(layer(h, idx), expected)


def test_default_init_adds_nothing_at_step_zero_and_its_tables_learn_from_the_first_step():
    """engram_init=zero_tables (the default): the output is exactly zero, so the model starts as
    without the layer; the first backward reaches the rows read (and only those), not yet W_K or
    W_V; after one Adam step the layer writes into the residual stream."""
    cfg = EngramConfig(layers=[0], heads=2, embed_dim=8, table_size=13)
    assert cfg.init == "zero_tables"
    layer = EngramLayer(DIM, cfg, 0, VOCAB, plan_table_sizes(cfg)[0])
    idx, h = _tokens(2, 10), torch.randn(2, 10, DIM)
    out = layer(h, idx)
    assert torch.equal(out, torch.zeros_like(out))
    out.mul(torch.randn_like(out)).sum().backward()
    read = torch.zeros(layer.tables.num_embeddings, dtype=torch.bool)
    read[layer.rows(idx).flatten()] = True
    row_grad = layer.tables.weight.grad.abs().sum(1)
    assert (row_grad[read] > 0).all() and not row_grad[~read].any()
    assert not layer.value_proj.weight.grad.any() and not layer.key_proj.weight.grad.any()
    torch.optim.Adam(layer.parameters(), lr=1e-2).step()
    assert layer(h, idx).abs().amax() > 0


def test_old_init_writes_random_rows_into_the_residual_stream_maxtext_rows_of_norm_one():
    """engram_init=residual (pkmlm's init until 2026-12-07) and maxtext, at the paper's default
    shape (R * E = 1024 rows' entries per token) and the tiny model's dim: the value W_V e has the
    RMS that docs/engram.md ("Initialisation") reports, far above a zero_tables layer's 0."""
    residual_std = 0.02 / math.sqrt(2 * 4)  # the tiny model's residual-projection std (4 layers)
    idx = torch.randint(1, VOCAB, (4, 64), generator=torch.Generator().manual_seed(3))
    value_rms = {}
    for init in ("residual", "maxtext"):
        cfg = EngramConfig(layers=[0], table_size=101, init=init)
        cfg.validate()
        torch.manual_seed(0)
        layer = EngramLayer(256, cfg, 0, VOCAB, plan_table_sizes(cfg)[0])
        layer.reset_parameters(residual_std)
        with torch.no_grad():
            value_rms[init] = layer.value_proj(layer.lookup(layer.rows(idx))).pow(2).mean().sqrt().item()
        E = layer.row_dim
        table_std = {"residual": 1.0, "maxtext": 1 / math.sqrt(E)}[init]
        assert layer.tables.weight.std().item() == pytest.approx(table_std, rel=0.05)
    # residual: sqrt(R * E) * residual_std = sqrt(1024) * 0.00707 = 0.226 (x the gate's ~0.5 = 2.6 x the
    # 0.044 RMS entering block 1); maxtext: the rows' RMS, 1 / sqrt(E) = 0.125.
    assert value_rms["residual"] == pytest.approx(math.sqrt(1024) * residual_std, rel=0.1)
    assert value_rms["maxtext"] == pytest.approx(1 / math.sqrt(64), rel=0.1)


@pytest.mark.parametrize(
    "field,value",
    [
        ("layers", [1, 1]),
        ("layers", [4]),
        ("max_ngram", 1),
        ("embed_dim", 7),
        ("table_size", 1),
        ("heads", 0),
        ("init", "zeros"),
    ],
)
def test_config_refuses_bad_values(field, value):
    cfg = EngramConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"model.memory.{field}="):
        cfg.validate(n_layers=4)


# --- tokenizer compression ------------------------------------------------------------------------


def _word_tokenizer(words) -> Tokenizer:
    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))


WORDS = ["<|endoftext|>", "<unk>", "Apple", " apple", "APPLE", "apple", "Café", "cafe", "ＣＡＦＥ", "banana"]
WORDS += [" ", "\n", " \t ", "  Banana\n", "é"]


def test_compression_merges_case_accents_width_and_whitespace():
    tok = _word_tokenizer(WORDS)
    comp = build_compression(tok)
    ids = dict(zip(WORDS, comp.canonical_ids.tolist()))
    assert ids["Apple"] == ids[" apple"] == ids["APPLE"] == ids["apple"]
    assert ids["Café"] == ids["cafe"] == ids["ＣＡＦＥ"]  # accents stripped, NFKC folds full width
    assert ids["banana"] == ids["  Banana\n"] != ids["apple"]
    assert ids[" "] == ids["\n"] == ids[" \t "] != ids["banana"]  # whitespace tokens: one space
    assert ids["é"] not in (ids["apple"], ids[" "])  # "e" alone is a token of its own
    assert len(set(ids.values())) == comp.size == 7
    assert comp.canonical_ids.tolist()[:3] == [0, 1, 2]  # numbered by first appearance
    assert canonical_text(" \u00c9T\u00c9\n\n") == "ete" and canonical_text("\u0301") == ""
    assert torch.equal(build_compression(tok).canonical_ids, comp.canonical_ids)  # deterministic


def test_byte_pieces_of_a_byte_level_bpe_stay_distinct():
    from pkmlm.data.tokenizer import train_bpe

    tok = train_bpe(["héllo wörld ünïcode ", "Hello World"] * 20, vocab_size=300)
    comp = build_compression(tok)
    pieces = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i], skip_special_tokens=False)]
    assert len(pieces) > 60  # the byte alphabet's non-ASCII half
    piece_ids = comp.canonical_ids[pieces]
    assert piece_ids.unique().numel() == len(pieces)
    decodable = [i for i in range(tok.get_vocab_size()) if i not in set(pieces)]
    assert not set(piece_ids.tolist()) & set(comp.canonical_ids[decodable].tolist())
    assert comp.size < tok.get_vocab_size()  # "H"/"h", "W"/"w" and the like merged


def test_mapping_saves_loads_and_refuses_another_tokenizer(tmp_path):
    tok = _word_tokenizer(WORDS)
    comp = build_compression(tok)
    path = str(tmp_path / "engram_compression.json")
    save_compression(comp, path)
    loaded = load_compression(path, tok)
    assert torch.equal(loaded.canonical_ids, comp.canonical_ids) and loaded.size == comp.size
    refusals = {
        "vocabulary of 15 tokens, the run's tokenizer has 16": _word_tokenizer(WORDS + ["kiwi"]),
        "built for another tokenizer": _word_tokenizer(WORDS[:-1] + ["kiwi"]),
    }
    for message, other in refusals.items():
        with pytest.raises(DataError, match=message) as info:
            load_compression(path, other)
        assert "\n" not in str(info.value) and path in str(info.value)
    payload = json.loads((tmp_path / "engram_compression.json").read_text())
    for name, text in {
        "format": json.dumps({**payload, "format": 99}),
        "malformed": json.dumps({**payload, "canonical_ids": payload["canonical_ids"][:-1] + [999]}),
        "unreadable": "{not json",
    }.items():
        (tmp_path / f"{name}.json").write_text(text)
        with pytest.raises(DataError, match=name) as info:
            load_compression(str(tmp_path / f"{name}.json"), tok)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="no Engram compression mapping"):
        load_compression(str(tmp_path / "missing.json"), tok)


# --- usage metrics ----------------------------------------------------------------------------------


def test_usage_tracker_counts_every_read_and_the_mean_gate():
    layer = _layer()
    tracker = TableUsage.of(layer)
    gates = []
    layer.observer = lambda rows, gate: (tracker(rows, gate), gates.append(gate))
    idx, h = _tokens(2, 16), torch.randn(2, 16, DIM)
    with torch.no_grad():
        layer(h, idx)
    stats = tracker.compute()
    rows = layer.rows(idx)
    assert int(tracker.count_S.sum()) == rows.numel()
    order2 = rows[..., : layer.heads].unique().numel() / sum(layer.sizes.tolist()[: layer.heads])
    assert stats["order2/usage"] == pytest.approx(order2)
    assert stats["usage"] == pytest.approx(rows.unique().numel() / layer.tables.num_embeddings)
    assert stats["gate_mean"] == pytest.approx(float(gates[0].double().mean()))
    assert set(stats) >= {"order3/usage", "order3/kl_count", "order3/gini", "kl_count", "gini"}
    tracker.reset()
    assert math.isnan(tracker.compute()["gate_mean"]) and tracker.compute()["usage"] == 0.0


def test_collision_rates_match_a_dictionary_count():
    layer = _layer(table_size=5)  # tiny tables: many collisions, but not all
    idx = _tokens(2, 24)
    stats = collision_rates(layer, idx)
    rows = layer.rows(idx).flatten(0, 1).tolist()
    canon = layer.canonical_ids.tolist()
    for n in (2, 3):
        grams = {}
        for b in range(2):
            start = 0
            for t in range(24):
                start = t if t > 0 and idx[b, t - 1] == EOT else start
                key = tuple(canon[idx[b, t - k]] if t - k >= start else layer.pad_id for k in range(n))
                grams[key] = rows[b * 24 + t][(n - 2) * layer.heads : (n - 1) * layer.heads]
        heads = list(zip(*grams.values()))
        per_head = [sum(col.count(r) > 1 for r in col) / len(col) for col in heads]
        tuples = list(map(tuple, grams.values()))
        assert stats[f"order{n}/ngrams"] == len(grams)
        assert stats[f"order{n}/collision"] == pytest.approx(sum(per_head) / len(per_head))
        assert stats[f"order{n}/full_collision"] == pytest.approx(
            sum(tuples.count(r) > 1 for r in tuples) / len(tuples)
        )
        assert 0 < stats[f"order{n}/collision"] < 1


def _trigram_loss(break_hash: bool) -> float:
    """Next token = a fixed random function of the last three tokens; a model of token embedding ->
    Engram -> unembedding (no attention: only the hashed n-grams carry the earlier tokens), trained
    30 Adam steps on one batch; its final loss."""
    torch.manual_seed(0)
    V, dim = 16, 32
    rule = torch.randint(0, V, (V, V, V))
    seq = torch.randint(0, V, (8, 3 + 64))
    for t in range(3, seq.shape[1]):
        seq[:, t] = rule[seq[:, t - 3], seq[:, t - 2], seq[:, t - 1]]
    idx, targets = seq[:, 2:-1], seq[:, 3:]
    cfg = EngramConfig(layers=[0], heads=2, embed_dim=32, table_size=2048)
    layer = EngramLayer(dim, cfg, 0, V, plan_table_sizes(cfg)[0])
    layer.eot_id.fill_(-1)  # no end-of-text token in this language
    if break_hash:
        layer.multipliers.zero_()  # every n-gram reads the same rows
    emb, head = torch.nn.Embedding(V, dim), torch.nn.Linear(dim, V)
    opt = torch.optim.Adam([*layer.parameters(), *emb.parameters(), *head.parameters()], lr=3e-2)
    for _ in range(30):
        h = emb(idx)
        loss = torch.nn.functional.cross_entropy(head(h + layer(h, idx)).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_layer_learns_a_trigram_language_that_only_its_lookup_can_see():
    """Far below the log 16 nats of guessing with the hash, and not without it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation on a busy machine
    try:
        assert _trigram_loss(break_hash=False) < 0.1 * math.log(16) < _trigram_loss(break_hash=True)
    finally:
        torch.set_num_threads(threads)


def test_bf16_autocast_keeps_the_gate_in_fp32_and_stays_close():
    layer = _layer()
    idx, h = _tokens(2, 16), torch.randn(2, 16, DIM)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            e = layer.lookup(layer.rows(idx))
            assert layer.gate(h, layer.key_proj(e)).dtype == torch.float32
            out = layer(h, idx)
        torch.testing.assert_close(out.float(), layer(h, idx), rtol=0.05, atol=0.05)


def test_config_messages_name_the_prefixed_key():
    with pytest.raises(ConfigError, match=r"model\.memory\.engram_heads=0 is invalid"):
        EngramConfig(heads=0).validate(prefix="model.memory.engram_")
    EngramConfig().validate(n_layers=2)  # the defaults are valid


def test_decoding_in_steps_with_padding_equals_the_full_forward_of_each_row():
    """Left-padded prompts, then token-by-token steps in which one row sits out once, then a chunk:
    every real token's output equals the full forward of its row's real tokens (end-of-text tokens
    included, so document starts are crossed during decoding too)."""
    layer = _layer().eval()
    g = torch.Generator().manual_seed(5)
    lengths, prompt = [30, 22, 14], [9, 5, 1]  # real tokens per row, and of its prompt
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    seqs[0][12] = seqs[1][3] = seqs[1][4] = seqs[2][0] = EOT
    hs = [torch.randn(n, DIM, generator=g) for n in lengths]
    with torch.no_grad():
        expected = [layer(h[None], s[None])[0] for h, s in zip(hs, seqs)]
    # The schedule of calls: (tokens per row this call) with a row's count 0 when it sits out.
    calls = [prompt] + [[1, 1, 1]] * 4 + [[1, 0, 1], [1, 1, 1]] + [[6, 6, 6]] + [[10, 8, 4]]
    state, done = layer.new_decode_state(3), [0, 0, 0]
    got = [[] for _ in lengths]
    for counts in calls:
        T = max(counts)
        idx, h, valid = (
            torch.zeros(3, T, dtype=torch.int64),
            torch.zeros(3, T, DIM),
            torch.zeros(3, T, dtype=torch.bool),
        )
        for b, n in enumerate(counts):
            n = min(n, lengths[b] - done[b])
            idx[b, T - n :], h[b, T - n :], valid[b, T - n :] = (
                seqs[b][done[b] : done[b] + n],
                hs[b][done[b] : done[b] + n],
                True,
            )
            done[b] += n
        out = layer.decode(h, idx, state, valid)
        assert not out[~valid].any()
        for b in range(3):
            got[b].append(out[b][valid[b]])
    assert done == lengths
    for b in range(3):
        torch.testing.assert_close(torch.cat(got[b]), expected[b], rtol=1e-5, atol=1e-5)


def test_most_read_rows_lists_the_ngrams_that_read_them():
    layer = _layer(table_size=5)
    idx = _tokens(2, 24)
    top = most_read_rows(layer, idx, top=6)
    rows = layer.rows(idx)
    counts = torch.bincount(rows.flatten(), minlength=layer.tables.num_embeddings)
    assert [t["reads"] for t in top] == counts.sort(descending=True).values[:6].tolist()
    canon, mult, sizes = layer.canonical_ids.tolist(), layer.multipliers.tolist(), layer.sizes.tolist()
    for t in top:
        assert t["reads"] == counts[t["row"]] == sum(n for _, n in t["ngrams"])
        col = (t["order"] - 2) * layer.heads + t["head"]
        for raw, _ in t["ngrams"]:  # each listed n-gram hashes to the row (oldest id first, -1 = pad)
            grams = [canon[i] if i >= 0 else layer.pad_id for i in reversed(raw)]
            mix = grams[0] * mult[0]
            for k in range(1, len(grams)):
                mix ^= grams[k] * mult[k]
            assert mix % sizes[col] + sum(sizes[:col]) == t["row"]


# --- in a model: pkmlm-inspect's section ------------------------------------------------------------


def test_inspect_lists_usage_collisions_and_the_most_read_rows_with_their_decoded_ngrams(tok, tmp_path):
    from pkmlm.analysis.report import write_report
    from pkmlm.analysis.side import inspect_side_layers
    from pkmlm.data.tokenizer import eos_id
    from pkmlm.model import MemoryConfig, ModelConfig, Transformer

    V = tok.get_vocab_size()
    memory = MemoryConfig(engram_layers=[1], engram_heads=2, engram_embed_dim=16, engram_table_size=29)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, n_layers=2, dim=16, n_heads=2, max_seq_len=32, memory=memory))
    engram = model.side_layers()["blocks.1.engram"]
    engram.adapt_to_tokenizer(tok, eos_id(tok), str(tmp_path), write=True)
    assert (tmp_path / "engram_compression.json").is_file() and int(engram.eot_id) == eos_id(tok)
    ids = tok.encode(" the cat sat on the mat. The Cat sat on the mat." * 8).ids[:64]
    batches = [torch.tensor(ids[:33])[None], torch.tensor(ids[31:64])[None]]
    side = inspect_side_layers(model, batches, "cpu", tok, top=3)
    entry = side["memory/layer1/engram"]
    assert entry["stats"]["usage"] > 0 and 0 < entry["stats"]["gate_mean"] < 1
    lines = entry["lines"]
    assert lines[0].startswith("order 2: ") and lines[1].startswith("order 3: ") and len(lines) == 5
    assert all(" reads: " in line for line in lines[2:])
    pieces = set(re.findall(r"'[^']*'", "".join(lines[2:])))  # the n-grams, decoded token by token
    assert pieces and pieces <= {repr(tok.decode([i])) for i in ids}
    report = write_report(
        tmp_path / "report", source={}, counts={}, contexts={}, n_most={}, history=[], batches=batches,
        tokenizer=tok, window=4, side=side,
    )  # fmt: skip
    text = report.read_text()
    assert "## memory/layer1/engram" in text and lines[2] in text and "| layer | slots |" not in text


def test_registered_options_are_checked_at_the_config_boundary_and_name_the_run():
    from pkmlm.experiments.report import variant_name
    from pkmlm.model import MemoryConfig, ModelConfig, variants

    on = {"engram_layers": [1], "engram_heads": 2, "engram_embed_dim": 16}
    ModelConfig(n_layers=2, memory=MemoryConfig(**on, kind="engram")).validate()
    refusals = {
        r"model\.memory\.engram_layers=\[2\] is invalid: each index must be in \[0, 1\]": {"engram_layers": [2]},
        r"model\.memory\.engram_embed_dim=15 is invalid": {"engram_embed_dim": 15},
    }
    for message, change in refusals.items():
        with pytest.raises(ConfigError, match=message) as info:
            ModelConfig(n_layers=2, memory=MemoryConfig(**{**on, **change})).validate()
        assert "\n" not in str(info.value)
    # shard_values shards the product-key tables; Engram's stay replicated (tests/e2e/test_distributed.py)
    ModelConfig(n_layers=2, memory=MemoryConfig(**on, layers=[0], shard_values=True)).validate()
    assert (
        variants.kind_of({"layers": [], **on}) == "engram"
        and variant_name({"layers": [], **on}) == "Engram (engram L1)"
    )
    both = {"layers": [0], "values_kind": "peer", **on}
    assert variant_name(both) == "PEER + Engram (replace, engram L1)"
    assert variant_name({"layers": [], "engram_heads": 2}) == "dense"  # options without layers: off


@pytest.mark.parametrize("percent", [0, 25, 50, 75, 100])
def test_each_allocation_arm_splits_the_same_table_budget(percent):
    """experiment=sweep/engram_allocation: every arm composes and validates, its table parameters
    (product-key values + Engram tables) are memory=tiny's 4.19M to 2%, `percent` of them Engram."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from pkmlm.config import config_dir, register_configs, validate
    from pkmlm.model import Transformer

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        composed = compose(config_name="config", overrides=[f"+experiment/engram_alloc=p{percent}"])
    cfg = OmegaConf.to_object(composed)
    validate(cfg)
    with torch.device("meta"):
        counts = Transformer(dataclasses.replace(cfg.model, vocab_size=8192)).count_parameters()
    assert counts["memory_values"] == pytest.approx(128**2 * 256, rel=0.02)
    assert counts["side_tables"] / counts["memory_values"] == pytest.approx(percent / 100, abs=0.02)
