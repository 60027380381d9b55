"""`pkmlm-export RUN --out DIR --format hf` (pkmlm/checkpoint/hf_export.py, modeling_pkmlm.py): the
directory loads through transformers' Auto classes in a process where pkmlm cannot be imported, with
pkmlm's logits (1e-5) and loss, and `model.generate` gives `pkmlm.generate`'s greedy tokens, alone
and as a left-padded batch; for the dense model and every memory preset of configs/memory (plus
learned positions with a LayerNorm query norm and v_dim != dim, and bfloat16 tables)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import PRESETS, tiny_model

from pkmlm.data.tokenizer import train_bpe
from pkmlm.run import Run, export_run, generate, load_run

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None, reason="needs transformers (pip install -e '.[hf]')"
    ),
    pytest.mark.usefixtures("one_thread"),
]

TEXTS = ["The memory layer reads a few values from a very large table.", "Product keys make the search fast."] * 5
PROMPT = "The memory layer reads"
BATCH = ["The", "Product keys make the search"]
NEW = 8
CASES = {
    **{preset: dict() for preset in PRESETS},
    "learned_layernorm_vdim": dict(pos_emb="learned", memory_overrides=dict(query_norm="layernorm", v_dim=24)),
    "bf16_values": dict(memory_overrides=dict(values_dtype="bfloat16")),
}

# Runs with `sys.modules["pkmlm"] = None`: any import of pkmlm fails there.
LOADER = """
import json, sys
sys.modules["pkmlm"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    single = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids):]
    enc = tok(BATCH, padding=True, return_tensors="pt")
    batch = model.generate(**enc, max_new_tokens=NEW, do_sample=False)[:, enc["input_ids"].shape[1]:]
    torch.save(logits, f"{path}/hf_logits.pt")
    out[name] = dict(ids=ids, loss=float(loss), single=single.tolist(), batch=batch.tolist(), training=model.training)
out["pkmlm_modules"] = sorted(m for m in sys.modules if m.startswith("pkmlm") and sys.modules[m] is not None)
open(sys.argv[2], "w").write(json.dumps(out))
"""


def _model(name: str):
    kwargs = dict(CASES[name])
    return tiny_model(name if name in PRESETS else "tiny", vocab_size=320, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case exported (the last through the CLI, from a pkmlm export), and what transformers made of them."""
    from pkmlm.cli.export import main as export_main

    root = tmp_path_factory.mktemp("hf")
    tok = train_bpe(TEXTS, vocab_size=300)
    runs, dirs = {}, {}
    for name in CASES:
        run = Run(
            model=_model(name), tokenizer=tok, config={"data": {"seq_len": 32}}, step=3, tokens=96, checkpoint=root
        )
        runs[name], dirs[name] = run, root / name
        if name == "tiny":
            export_run(run, root / "plain")
            export_main([str(root / "plain"), "--out", str(dirs[name]), "--format", "hf"])
        else:
            export_run(run, dirs[name], fmt="hf")
    code = LOADER.replace("PROMPT", repr(PROMPT)).replace("BATCH", repr(BATCH)).replace("NEW", str(NEW))
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps({k: str(v) for k, v in dirs.items()}), str(root / "hf.json")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # AutoTokenizer without trust_remote_code must not wait for an answer
        cwd=root,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},  # tiny models: threads only wait
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, dirs, tok, json.loads((root / "hf.json").read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_loads_the_export_with_pkmlm_logits_and_greedy_tokens(exported, name):
    runs, dirs, tok, hf = exported
    model, got = runs[name].model, hf[name]
    assert hf["pkmlm_modules"] == []  # the loader never imported pkmlm
    assert got["ids"] == tok.encode(PROMPT).ids and not got["training"]
    ids = torch.tensor([got["ids"]])
    with torch.no_grad():
        logits, loss = model(ids[:, :-1], ids[:, 1:])
        full = model(ids)[0][0]
    torch.testing.assert_close(torch.load(dirs[name] / "hf_logits.pt"), full, rtol=0, atol=1e-5)
    assert got["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert got["single"] == generate(model, got["ids"], NEW, temperature=0)
    assert got["batch"] == generate(model, [tok.encode(t).ids for t in BATCH], NEW, temperature=0)


def test_the_hf_export_is_still_a_pkmlm_export(exported):
    runs, dirs, _, _ = exported
    names = sorted(p.name for p in dirs["peer"].iterdir() if p.name != "hf_logits.pt")
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "modeling_pkmlm.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    back = load_run(dirs["peer"])
    assert back.step == 3 and back.config == {"data": {"seq_len": 32}}
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(back.model(ids)[0], runs["peer"].model(ids)[0], rtol=0, atol=0)
    config = json.loads((dirs["peer"] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pkmlm.PkmlmForCausalLM"
    assert config["eos_token_id"] == 0 and config["model_config"]["memory"]["values_kind"] == "peer"
