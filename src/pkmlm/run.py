"""Load a finished (or running) run directory back into Python: `pkmlm.load_run(dir)`.

Needs torch and tokenizers only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pkmlm.errors import UserError
from pkmlm.model.memory import MemoryConfig
from pkmlm.model.transformer import ModelConfig, Transformer


@dataclass
class Run:
    model: Transformer
    tokenizer: Any  # tokenizers.Tokenizer
    config: dict  # the run's resolved config, as saved in the checkpoint
    step: int
    tokens: int
    checkpoint: Path


def model_config_from_dict(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mem_fields = {f.name for f in dataclasses.fields(MemoryConfig)}
    memory = MemoryConfig(**{k: v for k, v in d.get("memory", {}).items() if k in mem_fields})
    return ModelConfig(**{k: v for k, v in d.items() if k in fields and k != "memory"}, memory=memory)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """The newest valid checkpoint of run directory `path` (or the checkpoint file `path`), as an
    eval-mode model on `device` with its tokenizer and config."""
    from pkmlm.data.tokenizer import tokenizer_from_str
    from pkmlm.train.checkpoint import load_checkpoint
    from pkmlm.train.dcp import load_dcp_model, newest_checkpoint

    path = Path(path).expanduser()
    if path.is_dir():  # a run directory (newest checkpoint of either format) or a DCP checkpoint
        found = newest_checkpoint(path)
        if found is None:
            raise UserError(f"checkpoint={str(path)!r}: no valid checkpoint under {path / 'checkpoints'}")
    elif path.is_file():
        try:
            found = (path, load_checkpoint(path))
        except ValueError as e:
            raise UserError(f"checkpoint={str(path)!r}: {e}") from None
    else:
        raise UserError(f"checkpoint={str(path)!r}: no such run directory or checkpoint file")
    ckpt_path, state = found
    model = Transformer(model_config_from_dict(state["model_config"]))
    if state.get("format") == "dcp":  # saved by several processes (or checkpoint.format=dcp)
        load_dcp_model(ckpt_path, model)
    else:
        model.load_state_dict(state["model"])
    model.to(device).eval()
    tokenizer = tokenizer_from_str(state["tokenizer"])
    return Run(model=model, tokenizer=tokenizer, config=state["config"], step=state["step"],
               tokens=state["tokens"], checkpoint=ckpt_path)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> list[int]:
    """Sample a continuation (no KV cache: the window is re-run each token; fine for short samples)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        window = ids[:, -model.cfg.max_seq_len:]
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
    return ids[0, len(prompt_ids):].tolist()
