"""A trained model back in Python: `pkmlm.load_run(path)` and `pkmlm.generate`.

`path` is a run directory (its newest valid checkpoint), one checkpoint directory
(`RUN/checkpoints/step_XXXXXXXX.dcp`), or an export written by `pkmlm-export`
(`model.safetensors` + `config.json` + `tokenizer.json`). Nothing read can run code: checkpoints go
through `pkmlm.checkpoint` (JSON, DCP tensors without pickled objects, restricted metadata), exports
are safetensors and JSON. Needs torch, tokenizers and (for exports) safetensors.
"""

from __future__ import annotations

import dataclasses
import functools
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


EXPORT_FORMATS = ("pkmlm", "hf")


def export_run(run: Run, out: Path, fmt: str = "pkmlm") -> Path:
    """Write `run` as `out/model.safetensors` (the weights, tied ones once), `out/config.json`
    (model config, run config, step, tokens, source) and `out/tokenizer.json`. `fmt="hf"` adds
    what transformers needs to load it without pkmlm (`pkmlm.checkpoint.hf_export`)."""
    from safetensors.torch import save_model

    if fmt == "hf":
        from pkmlm.checkpoint.hf_export import check_hf_exportable

        check_hf_exportable(dataclasses.asdict(run.model.cfg))  # before anything is written
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
    if fmt == "hf":
        from pkmlm.checkpoint.hf_export import write_hf_files

        write_hf_files(out, info, run.tokenizer)
    return out


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    top_p: float | None = None,
    use_cache: bool = True,
) -> list[int] | list[list[int]]:
    """Sample a continuation of `prompt_ids` (a list of token ids), or of each prompt of a list of
    them (one batch, left-padded: the same tokens as one by one). `temperature <= 0` is greedy
    decoding; otherwise `top_k` / `top_p` restrict the sampling (`pkmlm.model.decoding.sample_next`).

    With `use_cache` (the default) the model decodes incrementally on a KV cache; without, every
    token re-runs the window, one prompt at a time (the reference the cache is tested against).
    Beyond `model.max_seq_len` tokens both slide the window (its last `max_seq_len` tokens). The
    model runs in eval mode (a BatchNorm query norm is causal only there) and is put back after."""
    from pkmlm.model.decoding import Decoder, sample_next

    batched = bool(prompt_ids) and not isinstance(prompt_ids[0], int)
    prompts = [list(p) for p in prompt_ids] if batched else [list(prompt_ids)]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. the end-of-text token)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k}; give a positive integer, or None for no top-k cut")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p}; give a probability in (0, 1], or None for no nucleus cut")
    sample = functools.partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            out: list[list[int]] = [[] for _ in prompts]
            if max_new_tokens > 0:
                decoder = Decoder(model, prompts, max_new_tokens)
                logits_BV = decoder.start()
                for i in range(max_new_tokens):
                    next_B = sample(logits_BV)
                    for row, token in zip(out, next_B.tolist()):
                        row.append(token)
                    if i + 1 < max_new_tokens:
                        logits_BV = decoder.step(next_B)
        else:
            out = [_generate_uncached(model, p, max_new_tokens, sample) for p in prompts]
    finally:
        model.train(was_training)
    return out if batched else out[0]


def _generate_uncached(model: Transformer, prompt: list[int], max_new_tokens: int, sample) -> list[int]:
    """One prompt, no cache: every token re-runs the window (its last `max_seq_len` tokens)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.cfg.max_seq_len :])
        next_id = sample(logits[:, -1, :].float())  # (1,)
        ids = torch.cat([ids, next_id.view(1, 1).to(device)], dim=1)
    return ids[0, len(prompt) :].tolist()
