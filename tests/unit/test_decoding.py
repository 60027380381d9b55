"""KV-cache decoding (model/kv_cache.py, model/decoding.py, `pkmlm.generate`): the cached logits of
every step equal a full forward of the sequence so far, greedy generation with the cache equals the
cacheless loop token for token (dense, every memory preset of configs/memory, learned positions,
past the window), a left-padded batch equals its rows one by one, and top-k / top-p sample only
from their sets."""

from __future__ import annotations

import pytest
import torch
from helpers import PRESETS, VOCAB, tiny_model

from pkmlm.model.decoding import Decoder, sample_next
from pkmlm.run import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_logits_equal_a_full_forward_and_greedy_equals_the_cacheless_loop(preset):
    model = tiny_model(preset)
    (prompt,) = prompts(5)
    decoder = Decoder(model, [prompt], max_new_tokens=8)
    logits_BV, ids = decoder.start(), list(prompt)
    with torch.no_grad():
        for _ in range(8):
            full_V = model(torch.tensor([ids]))[0][0, -1]
            torch.testing.assert_close(logits_BV[0], full_V, rtol=0, atol=1e-5)
            ids.append(int(logits_BV[0].argmax()))
            logits_BV = decoder.step(torch.tensor(ids[-1:]))
    cached = generate(model, prompt, 12, temperature=0)
    assert cached == generate(model, prompt, 12, temperature=0, use_cache=False)
    assert cached[:8] == ids[len(prompt) :]


@pytest.mark.parametrize("preset", ["none", "tiny", "ultramem"])
def test_a_left_padded_batch_equals_its_rows_one_by_one(preset):
    model = tiny_model(preset)
    batch = prompts(3, 9, 1, 6)
    together = generate(model, batch, 10, temperature=0)
    assert together == [generate(model, p, 10, temperature=0, use_cache=False) for p in batch]
    assert together[1] == generate(model, batch[1], 10, temperature=0)  # a list of ids still gives one list


def test_learned_positions_and_the_window_slide_as_without_a_cache():
    """Past `max_seq_len` tokens both paths keep the last `max_seq_len` (positions from 0 again)."""
    for pos_emb in ("learned", "rope"):
        model = tiny_model("tiny", pos_emb=pos_emb, max_seq_len=12)
        batch = prompts(4, 10)
        cached = generate(model, batch, 9, temperature=0)
        assert cached == [generate(model, p, 9, temperature=0, use_cache=False) for p in batch]


def test_finished_rows_can_leave_the_batch():
    model = tiny_model("memory_plus")
    batch = prompts(4, 7, 2)
    decoder = Decoder(model, batch, max_new_tokens=4)
    logits_BV = decoder.start()
    for _ in range(2):
        logits_BV = decoder.step(logits_BV.argmax(-1))
    decoder.keep([2, 0])  # row 1 finished; the others in a new order
    kept = logits_BV[[2, 0]].argmax(-1)
    rest = [kept.tolist()]
    logits_BV = decoder.step(kept)
    rest.append(logits_BV.argmax(-1).tolist())
    full = [generate(model, batch[r], 4, temperature=0) for r in (2, 0)]
    assert [[step[i] for step in rest] for i in range(2)] == [f[2:] for f in full]


def test_the_cache_needs_eval_mode_and_refuses_rows_past_the_window():
    model = tiny_model("tiny", max_seq_len=8).train()
    with pytest.raises(ValueError, match="needs eval mode"):
        model(torch.ones(1, 3, dtype=torch.long), cache=model.new_cache(1, 4))
    model.eval()
    cache = model.new_cache(1, 16)
    model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="beyond model.max_seq_len=8"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    train_mode = tiny_model("tiny").train()
    generate(train_mode, [1, 2], 2, temperature=0)
    assert train_mode.training  # generate ran in eval mode and put the mode back


def test_top_k_and_top_p_sample_only_from_their_sets():
    logits_BV = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 400)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits_BV, top_k=2, generator=g).tolist()) == {0, 1}
    probs = torch.softmax(logits_BV[0], -1)  # 0.64, 0.23, 0.09, ...: 0.64 + 0.23 reaches 0.8
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert set(sample_next(logits_BV, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits_BV, top_p=1e-6, generator=g).tolist()) == {0}  # the top token is always kept
    assert set(sample_next(logits_BV, temperature=100.0, generator=g).tolist()) == set(range(6))
    assert sample_next(logits_BV[:3], temperature=0).tolist() == [0, 0, 0]
    model = tiny_model("peer")
    (prompt,) = prompts(4)

    def sampled(**kw) -> list[int]:
        return generate(model, prompt, 6, temperature=0.8, generator=torch.Generator().manual_seed(3), **kw)

    assert sampled(top_k=1) == sampled(top_p=1e-6) == generate(model, prompt, 6, temperature=0)
    assert sampled(top_k=5, top_p=0.9) == sampled(top_k=5, top_p=0.9, use_cache=False)  # same draws, same logits
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=0.0)
