"""The config rules through a real run: pkmlm-train's `main()` in this process checks each rule once
(tests/unit/test_config.py checks the rules alone)."""

from __future__ import annotations

from hydra.core.global_hydra import GlobalHydra


def test_a_command_line_run_checks_each_rule_once(tmp_path, monkeypatch):
    """Each config rule runs once per process (issue 22): pkmlm-train checks every job before Hydra
    starts, and `train()` checks the config it is given with the same function (`check_run`); the
    second is a lookup. Counted in a real run of pkmlm-train's `main()` in this process: the data
    group's rules (they ran four times: in the precheck's validate and resolve_data, and again in
    train()), the root's, the data paths and the memory estimate."""
    import collections
    import sys

    from helpers import overrides

    import pkmlm.config
    import pkmlm.data.config
    import pkmlm.errors
    import pkmlm.train.checks
    from pkmlm.cli import train as cli_train

    runs: collections.Counter = collections.Counter()

    def count(module, name, key=None):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            if key is None or args[1] == key:  # require(ok, key, ...): the rule named `key`
                runs[key or name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    monkeypatch.setattr(pkmlm.errors, "_PASSED", {})  # what earlier tests of this process checked
    count(pkmlm.data.config, "require", "data.seq_len")  # DataConfig.validate's first rule
    count(pkmlm.config, "require", "train.device")  # a rule of TrainConfig.validate (check_device)
    count(pkmlm.config, "require", "name")  # the root validate's first rule (check_name)
    count(pkmlm.train.checks, "resolve_data")  # the data paths (globs, stat)
    count(pkmlm.train.checks, "check_fits_device")  # the memory estimate
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
    expected = ["data.seq_len", "train.device", "name", "resolve_data", "check_fits_device"]
    assert dict(runs) == dict.fromkeys(expected, 1)
