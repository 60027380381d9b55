"""evaluate(): token-weighted loss over uneven batches, memory usage over the whole pass, clean-up.

Shape legend: B sequences, T positions, V vocabulary, H heads, K knn.
"""

import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pkmlm.metrics.evaluate import bits_per_byte, evaluate, perplexity

VOCAB = 11


class FakeMemory(nn.Module):
    """ProductKeyMemory's observer interface; slot ids are a fixed function of the token ids."""

    def __init__(self, n_keys, heads, knn, dim):
        super().__init__()
        self.n_keys, self.heads, self.knn = n_keys, heads, knn
        self.observer = None
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def slot_ids(tokens_N, n_keys, heads, knn):
        h_H1 = torch.arange(heads).view(heads, 1)
        k_1K = torch.arange(knn).view(1, knn)
        return (tokens_N.view(-1, 1, 1) * 5 + h_H1 * 7 + k_1K) % n_keys**2  # (N, H, K)

    def forward(self, x_BTD, tokens_BT):
        indices_NHK = self.slot_ids(tokens_BT.reshape(-1), self.n_keys, self.heads, self.knn)
        weights_NHK = torch.full(indices_NHK.shape, 1 / self.knn)
        if self.observer is not None:
            self.observer(indices_NHK.detach(), weights_NHK.detach())
        return x_BTD + self.proj(x_BTD)


class FakeLM(nn.Module):
    """model(idx, targets) -> (logits, mean loss), memories at layers 0 and 2, dropout in train."""

    def __init__(self, dim=8, fail_on_call=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList([FakeMemory(4, 2, 3, dim), nn.Linear(dim, dim), FakeMemory(3, 1, 2, dim)])
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(dim, VOCAB)
        self.fail_on_call = fail_on_call
        self.calls = 0

    def memory_layers(self):
        return {i: m for i, m in enumerate(self.layers) if isinstance(m, FakeMemory)}

    def forward(self, idx_BT, targets_BT):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("model failure")
        x_BTD = self.embed(idx_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, idx_BT) if isinstance(layer, FakeMemory) else layer(x_BTD)
        logits_BTV = self.head(self.dropout(x_BTD))
        loss = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
        return logits_BTV, loss


def _batches():
    generator = torch.Generator().manual_seed(1)
    shapes = [(3, 9), (1, 5), (2, 17)]  # (B, T+1): different sizes, so the mean must be weighted
    return [torch.randint(0, VOCAB, shape, generator=generator) for shape in shapes]


def _manual_loss(model, batches):
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits_BTV, _ = model(b[:, :-1], b[:, 1:])
            total += F.cross_entropy(logits_BTV.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
            tokens += b[:, 1:].numel()
    return total / tokens, tokens


def test_loss_is_token_weighted_mean_and_memory_is_over_whole_pass():
    model, batches = FakeLM(), _batches()
    expected_loss, expected_tokens = _manual_loss(model, batches)
    model.train()
    result = evaluate(model, iter(batches), device="cpu")

    assert result["tokens"] == expected_tokens == 3 * 8 + 1 * 4 + 2 * 16
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    # the unweighted mean over batches differs: make sure the test can tell them apart
    per_batch = [
        F.cross_entropy(model.eval()(b[:, :-1], b[:, 1:])[0].flatten(0, 1), b[:, 1:].flatten()).item() for b in batches
    ]
    assert abs(sum(per_batch) / len(per_batch) - expected_loss) > 1e-4
    assert result["ppl"] == pytest.approx(math.exp(expected_loss), rel=1e-6)

    # memory usage accumulated over every input token of every batch
    for i, (n_keys, heads, knn) in {0: (4, 2, 3), 2: (3, 1, 2)}.items():
        tokens_N = torch.cat([b[:, :-1].reshape(-1) for b in batches])
        ids = FakeMemory.slot_ids(tokens_N, n_keys, heads, knn)
        counts = Counter(ids.flatten().tolist())
        assert result[f"memory/layer{i}/usage"] == len(counts) / n_keys**2
        p = [c / sum(counts.values()) for c in counts.values()]
        kl = math.log(n_keys**2) + sum(x * math.log(x) for x in p)
        assert result[f"memory/layer{i}/kl_count"] == pytest.approx(kl, abs=1e-9)
        # equal weights per read: the weighted and count distributions coincide
        assert result[f"memory/layer{i}/kl_weight"] == pytest.approx(kl, abs=1e-9)
    assert not any(key.startswith("memory/layer1/") for key in result)


def test_trackers_detached_and_mode_restored():
    model = FakeLM()
    model.train()
    evaluate(model, _batches(), device="cpu")
    assert model.training
    assert all(m.observer is None for m in model.memory_layers().values())
    model.eval()
    evaluate(model, _batches(), device="cpu")
    assert not model.training


def test_trackers_detached_and_mode_restored_when_the_model_raises():
    model = FakeLM(fail_on_call=2)
    model.train()
    with pytest.raises(RuntimeError, match="model failure"):
        evaluate(model, _batches(), device="cpu")
    assert model.training
    assert all(m.observer is None for m in model.memory_layers().values())
    # and the model can be evaluated again afterwards (nothing left attached)
    assert evaluate(model, _batches(), device="cpu")["tokens"] == 60


def test_no_batches():
    assert_nan_result = evaluate(FakeLM(), [], device="cpu")
    assert set(assert_nan_result) == {"loss", "ppl", "tokens"}
    assert math.isnan(assert_nan_result["loss"]) and math.isnan(assert_nan_result["ppl"])
    assert assert_nan_result["tokens"] == 0


def test_autocast_dtype_is_ignored_on_cpu():
    model, batches = FakeLM(), _batches()
    plain = evaluate(model, batches, device="cpu")
    with_dtype = evaluate(model, batches, device="cpu", autocast_dtype=torch.bfloat16)
    assert with_dtype["loss"] == plain["loss"]


def test_reduce_across_ranks_with_one_rank_is_identity(tmp_path):
    import torch.distributed as dist

    model, batches = FakeLM(), _batches()
    alone = evaluate(model, batches, device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        reduced = evaluate(model, batches, device="cpu", reduce_across_ranks=True)
    finally:
        dist.destroy_process_group()
    assert reduced == alone


def test_perplexity_and_bits_per_byte():
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))
    # 1000 bytes at ln 2 nats per byte = 1 bit per byte
    assert bits_per_byte(1000 * math.log(2), 1000) == pytest.approx(1.0)
    assert bits_per_byte(3.0, 2) == pytest.approx(3.0 / (2 * math.log(2)))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_metrics_modules_import_with_torch_only():
    code = (
        "import sys, pkmlm.metrics, pkmlm.metrics.memory_usage, pkmlm.metrics.evaluate; "
        "bad = [m for m in ('wandb', 'pkmlm.metrics.sinks') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "..", "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_pkmlm_eval_byte_count_is_the_texts_utf8_length():
    """pkmlm-eval's bpb divides by bytes counted per token id (metrics.bits_per_byte): the count
    must equal the UTF-8 length of the text the ids spell, multi-byte characters included, with
    end-of-text as one byte (the separator it stands for)."""
    from pkmlm.cli.eval import token_byte_lengths
    from pkmlm.data.tokenizer import train_bpe

    texts = ["Café au lait, naïve façade.", "Zürich – 東京 – emoji 🙂 end.", "plain ascii text " * 5]
    tok = train_bpe(texts * 20, 300)
    lengths = token_byte_lengths(tok)
    for text in texts:
        ids = tok.encode(text).ids
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert lengths[tok.token_to_id("<|endoftext|>")] == 1
