"""pkmlm-inspect: read counts against a brute count, listed contexts that really select their slot,
the report files, and the command end to end on a trained tiny run.

Shape legend: B sequences, T positions, N tokens, H heads, K knn, S slots.
"""

import json
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models

from pkmlm.analysis import collect_contexts, count_reads, pick_slots
from pkmlm.analysis.report import write_report
from pkmlm.model import MemoryConfig, ModelConfig, Transformer

VOCAB = 30


def tiny_model(seed=0):
    torch.manual_seed(seed)
    memory = MemoryConfig(layers=[0, 1], n_keys=6, heads=2, knn=3, k_dim=8)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layers=2, dim=16, n_heads=2, max_seq_len=32, memory=memory))
    return model.eval()


def batches(seed=1):
    gen = torch.Generator().manual_seed(seed)
    # uneven batches, as the evaluator's final partial window makes
    return [
        torch.randint(0, VOCAB, (3, 13), generator=gen),
        torch.randint(0, VOCAB, (2, 13), generator=gen),
        torch.randint(0, VOCAB, (1, 7), generator=gen),
    ]


def recorded_reads(model, inputs_BT):
    """Every (indices, weights) each memory layer reads in one forward, by a plain observer."""
    reads = {i: [] for i in model.memory_layers()}
    for i, memory in model.memory_layers().items():
        memory.observer = lambda ids, w, i=i: reads[i].append((ids.clone(), w.clone()))
    try:
        with torch.no_grad():
            model(inputs_BT)
    finally:
        for memory in model.memory_layers().values():
            memory.observer = None
    return {i: r[0] for i, r in reads.items()}


def test_counts_match_a_brute_count():
    model, data = tiny_model(), batches()
    counts = count_reads(model, data, "cpu")
    for layer, c in counts.items():
        brute = [Counter() for _ in range(2)]
        for batch in data:
            ids_NHK, _ = recorded_reads(model, batch[:, :-1])[layer]
            for h in range(2):
                brute[h].update(ids_NHK[:, h].flatten().tolist())
        expected_HS = torch.tensor([[brute[h][s] for s in range(36)] for h in range(2)])
        assert torch.equal(c.count_per_head, expected_HS)
        assert c.stats["usage"] == int((expected_HS.sum(0) > 0).sum()) / 36
    assert all(m.observer is None for m in model.memory_layers().values())


def test_listed_contexts_select_their_slot_and_are_the_heaviest():
    model, data = tiny_model(), batches()
    counts = count_reads(model, data, "cpu")
    per_slot = 4
    for layer, c in counts.items():
        most, drawn = pick_slots(c.count, top=2, random=2, seed=3)
        found = collect_contexts(model, data, {layer: most + drawn}, per_slot, "cpu", reads={layer: c.count})[layer]
        top = found[0]
        assert top.slot == int(c.count.argmax()) and top.reads == int(c.count.max())
        assert len(top.contexts) == per_slot
        # Re-run the model on each listed context (the sequence prefix ending at the marked token):
        # the slot is among the knn selected there, and the listed weight is the read weight.
        for ctx in top.contexts:
            prefix_1T = data[ctx.batch][ctx.row : ctx.row + 1, : ctx.position + 1]
            ids_NHK, w_NHK = recorded_reads(model, prefix_1T)[layer]
            last_HK, w_HK = ids_NHK[-1], w_NHK[-1]
            assert top.slot in last_HK.flatten().tolist()
            assert ctx.weight == pytest.approx(float(w_HK[last_HK == top.slot].sum()), abs=1e-5)
        # ... and they are the heaviest reads of that slot over all the data (brute force).
        all_weights = []
        for batch in data:
            ids_NHK, w_NHK = recorded_reads(model, batch[:, :-1])[layer]
            all_weights += (w_NHK * (ids_NHK == top.slot)).sum((1, 2)).tolist()
        heaviest = sorted((w for w in all_weights if w > 0), reverse=True)[:per_slot]
        assert [ctx.weight for ctx in top.contexts] == pytest.approx(heaviest, abs=1e-9)


def test_pick_slots_most_read_first_and_a_seeded_sample_of_the_rest():
    count_S = torch.tensor([0, 7, 2, 9, 0, 1, 7, 0])
    most, drawn = pick_slots(count_S, top=3, random=3, seed=0)
    assert most == [3, 1, 6]
    assert len(drawn) == 3 and not set(drawn) & set(most)
    assert pick_slots(count_S, top=3, random=3, seed=0) == (most, drawn)
    assert pick_slots(torch.zeros(4, dtype=torch.int64), top=2, random=1)[0] == []  # nothing read


def test_report_files(tmp_path):
    model, data = tiny_model(), batches()
    counts = count_reads(model, data, "cpu")
    picks = {i: pick_slots(c.count, 2, 2) for i, c in counts.items()}
    contexts = collect_contexts(
        model, data, {i: a + b for i, (a, b) in picks.items()}, 3, "cpu", reads={i: c.count for i, c in counts.items()}
    )
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    history = [{"step": s, "layers": {str(i): {"usage": 0.5, "kl_weight": 1.0} for i in counts}} for s in (3, 6)]
    report = write_report(
        tmp_path,
        source={"checkpoint": "x", "step": 6, "files": ["f"], "tokens": 10},
        counts=counts,
        contexts=contexts,
        n_most={i: 2 for i in counts},
        history=history,
        batches=data,
        tokenizer=tokenizer,
        window=4,
    )
    assert report == tmp_path / "report.md"
    for layer in (0, 1):
        for suffix in ("access.png", "heads.png", "history.png"):
            assert (tmp_path / f"layer{layer}_{suffix}").stat().st_size > 1000
        text = (tmp_path / f"layer{layer}.md").read_text()
        assert "## Most-read slots" in text and "⟦" in text and "| 6 | 50.00% | 1.000 |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"]["0"]["count_per_slot"] == counts[0].count.tolist()
    assert summary["layers"]["1"]["dead_fraction"] == pytest.approx(1 - counts[1].stats["usage"])
