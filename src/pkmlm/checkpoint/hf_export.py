"""The Hugging Face side of an export (`pkmlm-export RUN --out DIR --format hf`).

Added to pkmlm's three export files (model.safetensors, config.json, tokenizer.json) so that
transformers loads DIR without pkmlm:

  modeling_pkmlm.py       `PkmlmConfig` and `PkmlmForCausalLM`, torch + transformers only (this
                          package's `modeling_pkmlm.py`, copied as is)
  config.json             pkmlm's export config (model config, run config, step, tokens, source:
                          `pkmlm.load_run(DIR)` still reads it) plus what transformers reads:
                          model_type, architectures, auto_map (the classes of modeling_pkmlm.py),
                          the end-of-text token id, tie_word_embeddings
  tokenizer_config.json   a `PreTrainedTokenizerFast` over tokenizer.json, end-of-text as eos and
                          padding token, padding on the left (for batched `generate`)
  generation_config.json  eos / pad token ids for `generate`

The weights are pkmlm's file: modeling_pkmlm.py names its parameters as pkmlm does.

modeling_pkmlm.py is the one file outside pkmlm/model/variants/ that writes each memory variant's
forward (the stated exception to "a variant lives in its module"): a file transformers loads alone
cannot import pkmlm. tests/e2e/test_hf_export.py checks its logits against pkmlm's for every preset;
a variant it does not implement (`MemoryVariant.in_hf_export` false) is refused here, before
anything is written (`check_hf_exportable`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from pkmlm.data.tokenizer import EOS_TOKEN, eos_id
from pkmlm.errors import UserError
from pkmlm.model import variants

MODELING_FILE = "modeling_pkmlm.py"
HF_FILES = (MODELING_FILE, "tokenizer_config.json", "generation_config.json")


def modeling_source() -> str:
    """The text of modeling_pkmlm.py (read, never imported: pkmlm does not need transformers)."""
    return (resources.files("pkmlm.checkpoint") / MODELING_FILE).read_text()


def check_hf_exportable(model_config: dict) -> None:
    """Refuse (one line) a model whose memory uses a variant that modeling_pkmlm.py lacks."""
    memory = model_config.get("memory") or {}
    # Options count where a layer uses them: memory layers, or a variant's side layers (no `layers` needed)
    used = memory.get("layers") or any(v.side_layers(memory) for v in variants.side_variants())
    missing = variants.not_in_hf_export(memory) if used else []
    if missing:
        raise UserError(
            f"--format hf: modeling_pkmlm.py does not implement the memory option(s) {', '.join(missing)}; "
            "export without --format hf (pkmlm.load_run reads it), or add the variant's forward there"
        )


def hf_config(info: dict, eos: int) -> dict:
    """config.json of an hf export: pkmlm's export config `info` plus transformers' keys."""
    model = info["model_config"]
    return {
        **info,
        "model_type": "pkmlm",
        "architectures": ["PkmlmForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{MODELING_FILE[:-3]}.PkmlmConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PkmlmForCausalLM",
        },
        "tie_word_embeddings": bool(model.get("tie_embeddings", True)),
        "bos_token_id": eos,  # documents are separated (and an empty context begun) by end-of-text
        "eos_token_id": eos,
        "pad_token_id": eos,
        "use_cache": True,
    }


def hf_files(info: dict, tokenizer: Any) -> dict[str, str]:
    """The text of each file an hf export adds or replaces (name -> text); `tokenizer` is the run's
    `tokenizers.Tokenizer`."""
    eos = eos_id(tokenizer)
    max_len = int(info["model_config"].get("max_seq_len", 1024))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "model_max_length": max_len,
        "padding_side": "left",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    generation_config = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    return {
        MODELING_FILE: modeling_source(),
        "config.json": json.dumps(hf_config(info, eos), indent=2) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "generation_config.json": json.dumps(generation_config, indent=2) + "\n",
    }


def write_hf_files(out: Path, info: dict, tokenizer: Any) -> None:
    """Write `hf_files` into export directory `out` (config.json replaced by its superset)."""
    for name, text in hf_files(info, tokenizer).items():
        (Path(out) / name).write_text(text)
