"""lm-eval adapter (`pkmlm.harness.PkmlmLM`) and `pkmlm-harness`, offline: the three request types
against direct computation on a short trained run, local task YAMLs over local JSON files
(multiple choice, rolling log-likelihood, generation), and the harness's bits per byte against
pkmlm-eval's `bpb` on the same documents."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from conftest import C4
from helpers import eval_in_process, run_cli, train_in_process
from lm_eval.api.instance import Instance

from pkmlm.harness import PkmlmLM
from pkmlm.run import generate

pytestmark = pytest.mark.skipif(not C4.is_file(), reason="needs the C4 sample")

WINDOW = 32  # the tiny run's data.seq_len: the harness's window


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short memory-model run on C4 (helpers.TINY, 30 steps), and 12 C4 documents it never trained on."""
    root = tmp_path_factory.mktemp("harness")
    with gzip.open(C4, "rt") as f:
        lines = [json.loads(line)["text"] for line in f][-12:]  # the file's end: past the training steps
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    train_in_process(root / "run", "train.max_steps=30", "eval.interval=30", "checkpoint.interval=30")
    return root, root / "run", docs, lines


def _lm(run_dir: Path, batch_size: int = 3) -> PkmlmLM:
    return PkmlmLM.from_run(run_dir, batch_size=batch_size)


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _logprob(model, context: list[int], continuation: list[int]) -> float:
    """Direct: one sequence, one forward, summed log-probabilities of the continuation."""
    ids = context + continuation
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], -1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_loglikelihood_matches_direct_scoring(trained):
    _, run_dir, _, lines = trained
    lm = _lm(run_dir)
    assert lm.max_length == WINDOW and lm.eot_token_id == 0
    pairs = [
        ("The weather today", " is sunny"),
        ("", "Hello world"),
        (lines[0][:400], " and"),
        ("A list: ", "one, two"),
    ]  # long context: cut to the window; trailing space moves over
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    tok = lm.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context == "":
            ctx_ids, cont_ids = [0], tok.encode(continuation).ids
        else:
            stripped = context.rstrip()
            moved = context[len(stripped) :] + continuation
            whole = tok.encode(stripped + moved).ids
            ctx_ids, cont_ids = whole[: len(tok.encode(stripped).ids)], whole[len(tok.encode(stripped).ids) :]
        ctx_ids = (ctx_ids + cont_ids)[-(WINDOW + 1) :][: -len(cont_ids)]
        assert logprob == pytest.approx(_logprob(lm.model, ctx_ids, cont_ids), abs=1e-4)
        assert isinstance(greedy, bool)


def test_rolling_scores_disjoint_windows_no_longer_than_the_context(trained):
    _, run_dir, _, lines = trained
    lm = _lm(run_dir)
    seen = []
    hook = lm.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        short, long = "A short text.", lines[1][:600]
        got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", short), _req("loglikelihood_rolling", long)])
    finally:
        hook.remove()
    assert max(seen) <= WINDOW
    ids = lm.tokenizer.encode(short).ids
    assert got[0] == pytest.approx(_logprob(lm.model, [0], ids), abs=1e-4)
    ids = lm.tokenizer.encode(long).ids
    assert len(ids) > 3 * WINDOW
    # Window k predicts ids[32k : 32k+32] after the one token before it (end-of-text for the first).
    expected = sum(
        _logprob(lm.model, [0] if k == 0 else [ids[k - 1]], ids[k : k + WINDOW]) for k in range(0, len(ids), WINDOW)
    )
    assert got[1] == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_cut_at_stop_strings_and_batch_independent(trained):
    _, run_dir, _, lines = trained
    contexts = ["The city of", lines[2][:300], "In 2010,", "Hello"]
    requests = [_req("generate_until", c, {"until": ["."], "max_gen_toks": 10}) for c in contexts]
    batched = _lm(run_dir, batch_size=4).generate_until(requests)
    single = _lm(run_dir, batch_size=1).generate_until(requests)
    assert batched == single
    lm = _lm(run_dir)
    for context, text in zip(contexts, batched):
        ids = lm.tokenizer.encode(context).ids[-(WINDOW - 10) :]
        out = generate(lm.model, ids, max_new_tokens=10, temperature=0)
        if 0 in out:  # generation stops at end-of-text
            out = out[: out.index(0)]
        expected = lm.tokenizer.decode(out, skip_special_tokens=False)
        assert text == expected.split(".")[0] and "." not in text


def _task(path: Path, name: str, data: Path, body: str) -> None:
    path.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"
    )


@pytest.mark.slow
def test_pkmlm_harness_runs_local_tasks_and_agrees_with_pkmlm_eval_bpb(trained):
    root, run_dir, docs, lines = trained
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    mc = root / "mc.jsonl"
    mc.write_text(
        "".join(json.dumps({"q": t[:80], "choices": [t[80:100], "zzzz qqqq"], "label": 0}) + "\n" for t in lines)
    )
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": t[:60], "answer": t[60:70]}) + "\n" for t in lines))
    _task(
        tasks / "mc.yaml",
        "pkmlm_mc",
        mc,
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    )
    _task(
        tasks / "rolling.yaml",
        "pkmlm_rolling",
        docs,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n'
        "    higher_is_better: false\n",
    )
    _task(
        tasks / "gen.yaml",
        "pkmlm_gen",
        gen,
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n",
    )
    out = root / "results.json"
    result = run_cli(
        "pkmlm.cli.harness",
        [
            str(run_dir),
            "--tasks",
            "pkmlm_mc,pkmlm_rolling,pkmlm_gen",
            "--include-path",
            str(tasks),
            "--batch-size",
            "4",
            "--device",
            "auto",  # train.device's values (here: the CPU)
            "--output",
            str(out),
        ],
        cwd=root,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pkmlm_mc" in result.stdout and "bits_per_byte" in result.stdout  # lm-eval's table
    res = json.loads(out.read_text())["results"]
    assert 0 <= res["pkmlm_mc"]["acc,none"] <= 1 and 0 <= res["pkmlm_gen"]["exact_match,none"] <= 1
    harness_bpb = res["pkmlm_rolling"]["bits_per_byte,none"]
    eval_bpb = eval_in_process(f"checkpoint={run_dir}", f"data.files=[{docs}]")["bpb"]  # pkmlm-eval's number
    assert harness_bpb == pytest.approx(eval_bpb, rel=0.03)

    bad = run_cli(
        "pkmlm.cli.harness", [str(run_dir), "--tasks", "no_such_task", "--include-path", str(tasks)], cwd=root
    )
    assert bad.returncode == 2 and "no_such_task" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
