"""The config rules through a real run: pkmlm-train's `main()` in this process checks each rule once
(tests/unit/test_config.py checks the rules alone)."""

from __future__ import annotations

import collections
import sys

from hydra.core.global_hydra import GlobalHydra


def _count_rules(monkeypatch) -> dict:
    """Every `require` of every loaded pkmlm module (`require_one_of` included) recorded: by the
    function that checks (its calls that checked a rule; recursion folded: `_check_ints` walks the
    tree in one check) and by rule (its key and what it allows, wherever it is written: the wandb
    mode was checked by the config and again by the sink). Loaded first: the modules a run imports
    lazily."""
    import pkmlm.cli.train
    import pkmlm.errors
    import pkmlm.train.checks
    import pkmlm.train.loop  # noqa: F401

    calls: dict[tuple, list] = collections.defaultdict(list)
    frames = []  # held, so that no frame's id is reused while counting
    original = pkmlm.errors.require

    def counted(ok, key, value, allowed):
        frame = sys._getframe(1)
        while frame.f_code.co_filename == pkmlm.errors.__file__:  # require_one_of -> require
            frame = frame.f_back
        while frame.f_back is not None and frame.f_back.f_code is frame.f_code:
            frame = frame.f_back
        frames.append(frame)
        name = f"{frame.f_globals['__name__']}.{frame.f_code.co_qualname}"
        for what in (name, (key, allowed)):  # the check, and the rule: its key and what it allows
            if id(frame) not in calls[what]:
                calls[what].append(id(frame))
        return original(ok, key, value, allowed)

    for name, module in list(sys.modules.items()):
        if name.startswith("pkmlm") and getattr(module, "require", None) is original:
            monkeypatch.setattr(module, "require", counted)
    return calls


def test_a_command_line_run_checks_each_rule_once(tmp_path, monkeypatch):
    """Each config rule runs once per process (issue 22): pkmlm-train checks every job before Hydra
    starts, and `train()` checks the config it is given with the same function (`check_run`); the
    second is a lookup. Counted in a real run of pkmlm-train's `main()` in this process: every rule
    (`pkmlm.errors.require` in every module, by the function that checks it and by its key: the data
    group's rules ran four times, the model's three: the root's check, the memory estimate's model
    and the trained one; the wandb mode twice: the config's and the sink's), the data paths and the
    memory estimate."""
    from helpers import overrides

    import pkmlm.errors
    import pkmlm.train.checks
    from pkmlm.cli import train as cli_train

    monkeypatch.setattr(pkmlm.errors, "_PASSED", {})  # what earlier tests of this process checked
    calls = _count_rules(monkeypatch)
    runs: collections.Counter = collections.Counter()
    for name in ("resolve_data", "check_fits_device"):  # the data paths (globs, stat); the memory estimate
        original = getattr(pkmlm.train.checks, name)
        monkeypatch.setattr(
            pkmlm.train.checks, name, lambda *a, _f=original, _n=name, **k: (runs.update([_n]), _f(*a, **k))[1]
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PKMLM_RUN_TIME", "2020-01-01T00:00:00")  # set by the precheck: not for later tests
    run_dir = tmp_path / "run"
    args = overrides("train.max_steps=1", "eval.max_batches=1")
    monkeypatch.setattr(sys, "argv", ["pkmlm-train", *args, f"hydra.run.dir={run_dir}"])
    try:
        cli_train.main()
    finally:
        GlobalHydra.instance().clear()
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert dict(runs) == {"resolve_data": 1, "check_fits_device": 1}
    counts = {what: len(frames) for what, frames in calls.items()}
    assert {what: n for what, n in counts.items() if n != 1} == {}  # every check, every rule: once
    keys = {what[0] for what in counts if isinstance(what, tuple)}
    checked = {"data.seq_len", "train.device", "name", "model.n_heads", "model.memory.knn", "logging.wandb.mode"}
    assert checked <= keys, checked - keys  # the groups' rules were counted (and each ran once)
    assert len(keys) > 60
