"""A pkmlm model for EleutherAI's lm-evaluation-harness (lm-eval 0.4): `PkmlmLM`.

lm-eval asks a model three kinds of question, each a list of `Instance`s whose `args` are:

  loglikelihood          (context, continuation) -> (log p(continuation | context), is_greedy)
  loglikelihood_rolling  (text,)                 -> log p(text), the whole text scored
  generate_until         (context, gen_kwargs)   -> the greedy continuation, cut at a stop string

All log-likelihoods go through `pkmlm.metrics.continuations.score_continuations` (the scorer
behind `recall/*` too): batched longest first, each sequence at most the model's context
(`model.max_seq_len`) long, the context cut on the left when it is longer. Conventions follow
lm-eval's Hugging Face model, so numbers are comparable with published ones:
  - an empty context is the tokenizer's end-of-text token (pkmlm's document separator);
  - a context's trailing spaces move to the continuation, and the continuation's tokens are those
    of `encode(context + continuation)` after `encode(context)` (the tokenisation a document
    would get);
  - rolling log-likelihood scores disjoint windows of `max_length` tokens, the first after an
    end-of-text (`lm_eval.utils.get_rolling_token_windows`, context_len=1), so `bits_per_byte` of
    a rolling task is the model's bits per byte on those documents (pkmlm-eval's `bpb` when the
    windows coincide);
  - generation is greedy (sampling arguments are ignored), stops at end-of-text, at any `until`
    string or after `max_gen_toks` tokens (default 256, at most the window), and keeps the
    context's last `max_length - max_gen_toks` tokens so that prompt and answer fit one window;
    `batch_size` requests decode together on one KV cache (`pkmlm.model.decoding.Decoder`, contexts
    left-padded), each exactly as it would alone.

Shape legend: B requests in a batch, T positions, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pkmlm.metrics.continuations import score_continuations

__all__ = ["DEFAULT_MAX_GEN_TOKS", "PkmlmLM"]

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's Hugging Face model's default


class PkmlmLM(LM):
    """lm-eval's `LM` over a pkmlm causal LM and its `tokenizers.Tokenizer`."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        max_length: int | None = None,
    ):
        super().__init__()
        from pkmlm.data.tokenizer import eos_id

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_length = max_length or model.cfg.max_seq_len
        self.eot_token_id = eos_id(tokenizer)

    @classmethod
    def from_run(cls, path: str | Path, batch_size: int = 16, device: str = "cpu") -> PkmlmLM:
        """The newest valid checkpoint of a run directory (or a checkpoint file), as pkmlm-eval
        loads it. Its context is the window it was trained on (`data.seq_len`), which may be
        shorter than `model.max_seq_len` (positions beyond it were never trained)."""
        from pkmlm.run import load_run

        run = load_run(path, device=device)
        trained = (run.config.get("data") or {}).get("seq_len")
        max_length = min(int(trained), run.model.cfg.max_seq_len) if trained else None
        return cls(run.model, run.tokenizer, batch_size=batch_size, device=device, max_length=max_length)

    # --- tokens -------------------------------------------------------------------------------------

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), as lm-eval's Hugging Face model splits them."""
        if context == "":
            return [self.eot_token_id], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        n_context = len(self.tok_encode(context))
        return whole[:n_context], whole[n_context:]

    # --- the three request types ----------------------------------------------------------------------

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*req.args) for req in requests]
        scores = score_continuations(self.model, pairs, self.max_length, self.batch_size, self._device)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for window in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(
            owner, score_continuations(self.model, windows, self.max_length, self.batch_size, self._device)
        ):
            totals[i] += score.logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, `batch_size` requests at a time (longest context first)."""
        jobs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = (self.tok_encode(context) if context else [self.eot_token_id])[-(self.max_length - max_new) :]
            jobs.append((ids, until, max_new))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        out = [""] * len(jobs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, text in zip(chunk, self._greedy([jobs[i] for i in chunk])):
                out[i] = text
        return out

    def _greedy(self, jobs: list[tuple[list[int], list[str], int]]) -> list[str]:
        """Greedy decoding of a batch on one KV cache (`pkmlm.model.decoding.Decoder`): the contexts
        left-padded (each row decodes as it would alone), a finished row leaves the batch."""
        from pkmlm.model.decoding import Decoder

        generated: list[list[int]] = [[] for _ in jobs]
        texts = [""] * len(jobs)
        was_training = self.model.training
        self.model.eval()
        try:
            decoder = Decoder(self.model, [ids for ids, _, _ in jobs], max(n for _, _, n in jobs))
            logits_BV = decoder.start()
            live = list(range(len(jobs)))  # the jobs of the decoder's rows, in order
            while live:
                tokens = logits_BV.argmax(-1).tolist()
                still = []
                for pos, (row, token) in enumerate(zip(live, tokens)):
                    _, until, max_new = jobs[row]
                    if token == self.eot_token_id:
                        continue
                    generated[row].append(token)
                    texts[row] = self.tok_decode(generated[row])
                    stops = [texts[row].index(s) for s in until if s and s in texts[row]]
                    if stops:
                        texts[row] = texts[row][: min(stops)]
                    elif len(generated[row]) < max_new:
                        still.append(pos)
                if not still:
                    break
                if len(still) < len(live):
                    decoder.keep(still)
                    live = [live[pos] for pos in still]
                    tokens = [tokens[pos] for pos in still]
                logits_BV = decoder.step(torch.tensor(tokens))
        finally:
            self.model.train(was_training)
        return texts


def _leaf_tasks(tree: Any) -> list[Any]:
    """The tasks of lm-eval's (possibly nested: groups) task dict."""
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _leaf_tasks(value)]
    return [tree]


def check_tasks(manager: Any, tasks: list[str], num_fewshot: int | None) -> None:
    """Load every task's data (a local task's missing or unreadable data file fails here, not after
    the model loads) and check that `num_fewshot` examples can be drawn from each task's few-shot
    documents. One-line `UserError`."""
    import datasets
    from lm_eval.tasks import get_task_dict

    from pkmlm.errors import UserError

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a refusal stays one line; the evaluation shows its own bars
    try:
        task_dict = get_task_dict(tasks, manager)
    except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many kinds for an unreadable source
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"--tasks {','.join(tasks)}: cannot load the task data ({type(e).__name__}: {first}); check the data "
            "files its YAML names (or the Hub connection for lm-eval's own tasks)"
        ) from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if not num_fewshot:
        return
    for task in _leaf_tasks(task_dict):
        docs = task.fewshot_docs() if hasattr(task, "fewshot_docs") else None
        if docs is None:
            docs = task.eval_docs
        n = len(docs)
        # drawn from the evaluated split, one document (the one asked) is left out
        if num_fewshot > n - 1:
            raise UserError(
                f"--num-fewshot={num_fewshot}: task {getattr(task, 'task_name', task)!r} has only {n} documents to "
                f"draw examples from (at most {max(0, n - 1)}); give a smaller --num-fewshot"
            )


def run_harness(
    run: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """lm-eval's `simple_evaluate` on a pkmlm run: its results dict (no per-sample logs)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pkmlm.errors import UserError

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:  # before the model is loaded
        where = f" (nor under --include-path {include_path})" if include_path else ""
        raise UserError(
            f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}{where}; "
            "list them with `lm-eval ls tasks`, or give --include-path DIR with your task YAMLs"
        )
    check_tasks(manager, tasks, num_fewshot)  # their data read and --num-fewshot checked, before the model
    lm = PkmlmLM.from_run(run, batch_size=batch_size, device=device)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    return results
