"""A trained model back in Python: `pkmlm.load_run(path)` and `pkmlm.generate`.

`path` is a run directory (its newest valid checkpoint), one checkpoint directory
(`RUN/checkpoints/step_XXXXXXXX.dcp`), or an export written by `pkmlm-export`
(`model.safetensors` + `config.json` + `tokenizer.json`). Nothing read can run code: checkpoints go
through `pkmlm.checkpoint` (JSON, DCP tensors without pickled objects, restricted metadata), exports
are safetensors and JSON. Needs torch, tokenizers and (for exports) safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pkmlm.checkpoint.export import (
    checked_model_config,
    is_export,
    load_export_weights,
    model_config_from_dict,
    read_export,
)
from pkmlm.errors import UserError
from pkmlm.model.transformer import Transformer

__all__ = ["Run", "load_run", "export_run", "generate", "is_export", "model_config_from_dict"]


@dataclass
class Run:
    model: Transformer
    tokenizer: Any  # tokenizers.Tokenizer
    config: dict  # the run's resolved config, as saved in the checkpoint
    step: int
    tokens: int
    checkpoint: Path


def _load_export(path: Path) -> tuple[Transformer, dict, str]:
    from pkmlm.data.tokenizer import checked_tokenizer

    info = read_export(path)
    model_cfg = checked_model_config(info["model_config"], f"{path / 'config.json'}")
    checked_tokenizer(info["tokenizer"], str(path / "tokenizer.json"), model_cfg.vocab_size)
    model = Transformer(model_cfg)
    load_export_weights(model, path)
    return model, info, info["tokenizer"]


def _load_checkpoint(path: Path) -> tuple[Transformer, dict, str, Path]:
    from pkmlm.checkpoint import pieces, store
    from pkmlm.data.tokenizer import checked_tokenizer

    ckpt = store.find_for_reading(path)
    meta = store.read_meta(ckpt)
    missing = [k for k in ("model_config", "tokenizer") if k not in meta]
    if missing:
        raise UserError(
            f"checkpoint={str(ckpt)!r}: its meta.json lacks {' and '.join(missing)} (not a training run's checkpoint)"
        )
    # Every file checked before anything is allocated: the model config (and its size), the tokenizer
    # against the model's vocabulary, the tensor index against the model (in load_tensors).
    where = str(ckpt / store.META)
    model_cfg = checked_model_config(meta["model_config"], where)
    tokenizer = meta["tokenizer"]
    checked_tokenizer(tokenizer, where, model_cfg.vocab_size)
    model = Transformer(model_cfg)
    template = pieces.model_state_template(model)
    store.load_tensors(ckpt, template)
    pieces.load_model_state(model, template)
    return model, meta, tokenizer, ckpt


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """An eval-mode model on `device` with its tokenizer and config, from a run directory, a
    checkpoint or an export (see the module docstring)."""
    from pkmlm.data.tokenizer import tokenizer_from_str

    path = Path(path).expanduser()
    if is_export(path):
        model, info, tokenizer_text = _load_export(path)
        where = path
    else:
        model, info, tokenizer_text, where = _load_checkpoint(path)
    model.to(device).eval()
    return Run(
        model=model,
        tokenizer=tokenizer_from_str(tokenizer_text),
        config=info.get("config", {}),
        step=info["step"],
        tokens=info["tokens"],
        checkpoint=where,
    )


def export_run(run: Run, out: Path) -> Path:
    """Write `run` as `out/model.safetensors` (the weights, tied ones once), `out/config.json`
    (model config, run config, step, tokens, source) and `out/tokenizer.json`."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(run.model, str(out / "model.safetensors"))  # shared tensors (tied embeddings) once
    info = {
        "model_config": dataclasses.asdict(run.model.cfg),
        "config": run.config,
        "step": run.step,
        "tokens": run.tokens,
        "source": str(run.checkpoint),
    }
    (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "tokenizer.json").write_text(run.tokenizer.to_str())
    return out


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Sample a continuation (no KV cache: the window is re-run each token; fine for short samples).
    `temperature <= 0` is greedy decoding."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        window = ids[:, -model.cfg.max_seq_len :]
        logits, _ = model(window)
        logits = logits[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt_ids) :].tolist()
