"""scripts/engram_name_ablation.py: which tokens are a name's, and which Engram table rows the n-grams
with a name token (or of name tokens only) read, against positions worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pkmlm.model.variants.engram import Compression, EngramConfig, EngramLayer, plan_table_sizes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import engram_name_ablation as ablation  # noqa: E402

WORDS = ["<|endoftext|>", "Ann", "Lee", "was", "born", "works"]
TEXT = "Ann Lee was born Ann Lee works"  # tokens 1..7 after end-of-text at position 0


def _setup():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = EngramConfig(layers=[0], heads=2, embed_dim=8, table_size=101)  # orders 2 and 3
    cfg.validate(n_layers=1)
    layer = EngramLayer(8, cfg, 0, len(WORDS), plan_table_sizes(cfg)[0])
    layer.install_compression(Compression(torch.arange(len(WORDS)), len(WORDS), "test"), 0)
    return tok, layer


def test_name_tokens_are_those_overlapping_an_occurrence_of_the_name():
    tok, _ = _setup()
    enc = tok.encode(TEXT)
    assert ablation.name_token_mask(enc, TEXT, "Ann Lee") == [True, True, False, False, True, True, False]
    assert ablation.name_token_mask(enc, TEXT, "Bob") == [False] * 7


def test_rows_of_the_ngrams_with_a_name_token_and_of_name_tokens_only():
    tok, layer = _setup()
    rows_TR = layer.rows(torch.tensor([[0, *tok.encode(TEXT).ids]]))[0]  # (8, 2 orders x 2 heads)
    order = {2: slice(0, 2), 3: slice(2, 4)}

    def read(pairs):
        return {r for t, n in pairs for r in rows_TR[t, order[n]].tolist()}

    # Every (position, order) but these three has a name token in its n-gram: (0, 2) and (0, 3) are
    # end-of-text and padding; (4, 2) is "was born".
    with_name = [(t, n) for t in range(8) for n in (2, 3) if (t, n) not in {(0, 2), (0, 3), (4, 2)}]
    assert ablation.name_rows(layer, tok, 0, TEXT, "Ann Lee", inside=False) == read(with_name)
    # Name tokens alone: only the bigram "Ann Lee", at positions 2 and 6 (the same rows: one n-gram).
    assert rows_TR[2, order[2]].tolist() == rows_TR[6, order[2]].tolist()
    assert ablation.name_rows(layer, tok, 0, TEXT, "Ann Lee", inside=True) == read([(2, 2)])
    assert ablation.name_rows(layer, tok, 0, TEXT, "Bob", inside=False) == set()
