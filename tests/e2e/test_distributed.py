"""Distributed training on CPU with gloo: 2 processes against 1, sharded against unsharded values,
distributed checkpoints resumed on another number of processes, and the refusals.

End-to-end runs go through torchrun (`python -m torch.distributed.run --standalone`, which picks a
free port) and `pkmlm.cli.train`; the 1-process references run in-process with
`train.data_shards=2`, so that they see the same global batches as 2 processes (each rank runs one
of the 2 data shards; pkmlm/parallel/data_shards.py). Memory models use `query_norm=layernorm`:
training-time BatchNorm statistics are per rank.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import overrides, read_rows, train_in_process

from pkmlm.config import register_configs
from pkmlm.errors import ConfigError, UserError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
register_configs()

TOL = 1e-5  # the bound on loss differences between 2 processes and 1
# Two memory layers reading one shared value table, LayerNorm queries (per-token, so per-rank
# batches give the same reads as the whole batch).
# Two memory layers sharing one table, and an Engram layer (issue 23) whose tables stay replicated
# when the product-key table is sharded (model.memory.shard_values). Its tables start random
# (engram_init=maxtext): from the default zero tables, W_K's gradients are exactly zero at step 1 and
# tiny after, and Adam turns their float noise (2 processes' reduction order vs 1's) into lr-sized steps.
ENGRAM = (  # small tables: the defaults (67M parameters) would dominate every step and checkpoint here
    "model.memory.engram_layers=[0]",
    "model.memory.engram_init=maxtext",
    "model.memory.engram_heads=2",
    "model.memory.engram_embed_dim=16",
    "model.memory.engram_table_size=512",
)
MEMORY = (
    "model.memory.layers=[0,1]",
    "model.memory.share_values=true",
    "model.memory.query_norm=layernorm",
    *ENGRAM,
)


def _train_in_process(run_dir: Path, *extra: str) -> dict:
    return train_in_process(run_dir, *extra)


def _torchrun(run_dir: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pkmlm.cli.train",
        *overrides(*extra),
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _by_step(run_dir: Path, key: str) -> dict:
    """The last row's `key` per step (a resumed run logs re-run steps again)."""
    return {r["step"]: r[key] for r in read_rows(run_dir) if key in r}


def _assert_close(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) <= TOL, (step, a[step], b[step])


def _checkpoint_state(path: Path) -> dict:
    """A DCP checkpoint as one plain dict (model and optimizer, tensors whole)."""
    from pkmlm.checkpoint import store

    state = store.read(path)
    return {"model": state["model"], "optim": state["optim"]}


def _assert_states_close(a: dict, b: dict) -> None:
    """Every tensor of model and optimizer state within 0.1% (relative norm) of the other's: an
    optimizer state scaled by the process count (a gradient summed instead of averaged) is not."""

    def tensors(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from tensors(v, f"{prefix}{k}.")
            elif torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1:
                yield f"{prefix}{k}", v.double()

    ta, tb = dict(tensors(a)), dict(tensors(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        rel = (ta[k] - tb[k]).norm() / tb[k].norm().clamp_min(1e-12)
        assert rel < 1e-3, (k, rel.item())


def test_two_processes_equal_one_then_resume_on_one_and_on_two(tmp_path):
    """Memory model, values sharded over 2 ranks (DDP for the rest): same losses as 1 process with
    the same global batch; its checkpoint (saved on 2 ranks) resumes on 1 and on 2 and continues
    with the 1-process run's losses and states."""
    steps = ("train.max_steps=6", "eval.interval=3", "checkpoint.interval=3", *MEMORY)
    _train_in_process(tmp_path / "one", *steps, "train.data_shards=2")
    two = tmp_path / "two"
    _torchrun(two, *steps, "model.memory.shard_values=true", "train.stop_at_step=3")

    ref_loss, ref_val = _by_step(tmp_path / "one", "train/loss"), _by_step(tmp_path / "one", "val/loss")
    assert sorted(ref_loss) == [1, 2, 3, 4, 5, 6]
    rows = [r["step"] for r in read_rows(two) if "train/loss" in r]
    assert rows == [1, 2, 3]  # rank 0 alone writes metrics: one row per step
    _assert_close(_by_step(two, "train/loss"), ref_loss, [1, 2, 3])
    _assert_close(_by_step(two, "val/loss"), ref_val, [3])
    ckpt = two / "checkpoints" / "step_00000003.dcp"
    assert {p.name for p in ckpt.iterdir()} >= {".metadata", "meta.json", "data", "rng"}
    assert sorted(p.name for p in (ckpt / "data").iterdir()) == ["shard_00000.json", "shard_00001.json"]
    assert isinstance(json.loads((ckpt / "data" / "shard_00001.json").read_text()), dict)  # plain JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # both ranks wrote into one run dir

    # Saved on 2 ranks: resume on 1 process (a copy), and on 2 (the run itself).
    on_one = tmp_path / "on_one"
    shutil.copytree(two, on_one)
    _train_in_process(on_one, *steps, "model.memory.shard_values=true")
    _torchrun(two, *steps, "model.memory.shard_values=true")
    for resumed in (on_one, two):
        _assert_close(_by_step(resumed, "train/loss"), ref_loss, [4, 5, 6])
        _assert_close(_by_step(resumed, "val/loss"), ref_val, [6])
        final = resumed / "checkpoints" / "step_00000006.dcp"
        _assert_states_close(
            _checkpoint_state(final), _checkpoint_state(tmp_path / "one" / "checkpoints" / "step_00000006.dcp")
        )


def test_dense_two_processes_equal_one_with_ddp_and_fsdp(tmp_path):
    """Dense model with an Engram layer (issue 23), 2 processes with DDP (the default) and with FSDP2
    = 1 process, same global batch."""
    steps = (
        "train.max_steps=4",
        "eval.interval=4",
        "checkpoint.interval=4",
        "model.memory.layers=[]",
        *ENGRAM,
    )
    _train_in_process(tmp_path / "one", *steps, "train.data_shards=2")
    ref = _by_step(tmp_path / "one", "train/loss")
    for parallel in ("ddp", "fsdp"):
        _torchrun(tmp_path / parallel, *steps, f"train.parallel={parallel}")
        _assert_close(_by_step(tmp_path / parallel, "train/loss"), ref, [1, 2, 3, 4])
        _assert_close(_by_step(tmp_path / parallel, "val/loss"), _by_step(tmp_path / "one", "val/loss"), [4])
        grad = _by_step(tmp_path / parallel, "train/grad_norm")  # FSDP: clipped over its shards, the global norm
        _assert_close(grad, _by_step(tmp_path / "one", "train/grad_norm"), [1, 2, 3, 4])


# A memory model of one table per layer, 3 steps: its 1-process reference is trained once for the
# module (`memory_one`) and compared with 2 processes replicating, sharding and compiling it.
MEMORY_3 = (
    "train.max_steps=3",
    "eval.interval=3",
    "checkpoint.interval=3",
    "model.memory.layers=[0,1]",
    "model.memory.query_norm=layernorm",
)


@pytest.fixture(scope="module")
def memory_one(tmp_path_factory) -> Path:
    """`MEMORY_3` on 1 process with the 2 data shards of 2 processes' global batch."""
    run_dir = tmp_path_factory.mktemp("memory_3") / "one"
    _train_in_process(run_dir, *MEMORY_3, "train.data_shards=2")
    return run_dir


def test_memory_model_with_replicated_values_two_processes_equal_one(tmp_path, memory_one):
    """Memory model with its value tables replicated (no shard_values: DDP averages their gradients
    like every other parameter), one table per layer, 2 processes = 1 process."""
    _torchrun(tmp_path / "two", *MEMORY_3)
    for key, at in (("train/loss", [1, 2, 3]), ("val/loss", [3]), ("train/grad_norm", [1, 2, 3])):
        _assert_close(_by_step(tmp_path / "two", key), _by_step(memory_one, key), at)
    _assert_states_close(
        _checkpoint_state(tmp_path / "two" / "checkpoints" / "step_00000003.dcp"),
        _checkpoint_state(memory_one / "checkpoints" / "step_00000003.dcp"),
    )


def test_compiled_two_processes_equal_one(tmp_path, memory_one):
    """`train.compile=true` with DDP + sharded values and with FSDP2 (the wrapped model is compiled;
    the sharded read is a collective inside the graph's caller): same losses as 1 eager process."""
    for name, extra in (("ddp", ("model.memory.shard_values=true",)), ("fsdp", ("train.parallel=fsdp",))):
        _torchrun(tmp_path / name, *MEMORY_3, "train.compile=true", *extra)
        for key, at in (("train/loss", [1, 2, 3]), ("val/loss", [3])):
            _assert_close(_by_step(tmp_path / name, key), _by_step(memory_one, key), at)


# --- sharded values, unit level: 2 spawned processes -----------------------------------------------

# The models whose value tables are sharded, one spawn for all (was two: this file's and
# tests/unit/test_variants.py's): the 2019 layer with per-layer and shared tables (d=32); Memory+
# with its shared pool, PEER with per-layer tables and shared with a gate (d=16). `atol` per case.
SHARDED = {
    "pkm": (32, dict(), 1e-6),
    "pkm_shared": (32, dict(share_values=True), 1e-6),
    "memory_plus": (16, dict(gate="silu", qk_norm=True, query_norm="none", share_values=True), 1e-5),
    "peer": (16, dict(values_kind="peer"), 1e-5),
    "peer_shared_gated": (16, dict(values_kind="peer", share_values=True, gate="sigmoid", v_dim=8), 1e-5),
}


def _sharded_values_worker(rank: int, world: int, init_file: str) -> None:
    """Each rank's logits equal the unsharded model's rows for its tokens; the local columns'
    gradient equals the same columns of the unsharded gradient of the summed losses; replicated
    parameters' gradients summed over ranks equal the unsharded ones."""
    from pkmlm import MemoryConfig, ModelConfig, Transformer
    from pkmlm.parallel.parallelize import shard_value_tables

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for case, (dim, options, atol) in SHARDED.items():
            torch.manual_seed(0)
            memory = dict(layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=8, query_norm="layernorm")
            memory = MemoryConfig(**{**memory, **options})
            ref = Transformer(ModelConfig(vocab_size=64, n_layers=3, dim=dim, n_heads=2, memory=memory))
            sharded = copy.deepcopy(ref)
            names = shard_value_tables(sharded, mesh, torch.device("cpu"))
            assert names == [f"{name}.weight" for name in ref.value_tables()], (case, names)
            if case.startswith("pkm"):
                tables = ["blocks.0.memory.values.weight", "blocks.2.memory.values.weight"]
                assert names == (["shared_values.weight"] if memory.share_values else tables), names
            assert sharded.count_parameters() == ref.count_parameters()  # DTensor numel: the whole table
            x = torch.randint(0, 64, (2 * world, 6), generator=torch.Generator().manual_seed(1))
            ref_logits, ref_loss = ref(x, x)
            (ref_loss * world).backward()  # = the sum of the ranks' mean losses
            mine = x[2 * rank : 2 * rank + 2]
            logits, loss = sharded(mine, mine)
            loss.backward()
            torch.testing.assert_close(logits, ref_logits[2 * rank : 2 * rank + 2], atol=atol, rtol=0, msg=case)
            ref_params = dict(ref.named_parameters())
            for name, p in sharded.named_parameters():
                if name in names:
                    local = p.grad.to_local()
                    cols = local.shape[1]
                    expected = ref_params[name].grad[:, rank * cols : (rank + 1) * cols]
                    torch.testing.assert_close(local, expected, atol=atol, rtol=0, msg=f"{case} {name}")
                else:
                    summed = p.grad.clone()
                    dist.all_reduce(summed)
                    torch.testing.assert_close(summed, ref_params[name].grad, atol=atol, rtol=0, msg=f"{case} {name}")
    except BaseException:
        dist.destroy_process_group()
        raise
    # As pkmlm-train does under torchrun: interpreter teardown after gloo may abort a rank.
    from pkmlm.parallel.launch import finish_distributed_run

    finish_distributed_run()


def test_sharded_values_equal_unsharded_in_forward_and_backward(tmp_path):
    mp.spawn(_sharded_values_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# --- refusals, before any work ---------------------------------------------------------------------


def test_refusals_name_the_key_and_what_to_do(tmp_path):
    from pkmlm.parallel.agree import check_batch_split
    from pkmlm.parallel.data_shards import plan_data_shards
    from pkmlm.parallel.env import DistInfo
    from pkmlm.parallel.parallelize import check_parallel_config

    two, three = DistInfo(rank=0, world_size=2, backend="gloo"), DistInfo(rank=0, world_size=3, backend="gloo")
    with pytest.raises(UserError, match="cannot split 2 data shards"):
        plan_data_shards(None, 12, three, resumed=2)  # saved on 2 ranks, resumed on 3
    assert plan_data_shards(None, 12, DistInfo(), resumed=2) == 2  # ... on 1: it runs both shards
    with pytest.raises(ConfigError, match="train.batch_size=6"):
        plan_data_shards(4, 6, two)
    with pytest.raises(ConfigError, match="model.memory.shard_values"):
        check_parallel_config("ddp", True, 64, three)  # 64 columns do not split into 3
    with pytest.raises(ConfigError, match="train.micro_batch_size=3"):
        check_batch_split(8, 3, two)
    # Hydra multirun inside torchrun: one line on stderr, exit status 2, before any process group.
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    for sweep in (["-m"], ["--multirun"], ["hydra.mode=MULTIRUN"]):
        proc = subprocess.run(
            [sys.executable, "-m", "pkmlm.cli.train", *sweep, "seed=1,2"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, (sweep, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "multirun" in lines[0] and "one torchrun job per configuration" in lines[0]


def test_slurm_tasks_of_the_hydra_launcher_become_ranks():
    """`hydra/launcher=slurm hydra.launcher.tasks_per_node=N`: each task's SLURM variables become
    torchrun's (through submitit), so the task joins the job's process group as one rank."""
    pytest.importorskip("submitit")
    from pkmlm.parallel.env import _export_submitit_environment

    saved = dict(os.environ)  # the export writes os.environ: restore all of it, or later runs would join "gpu07"
    try:
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ.update(
            {
                "SUBMITIT_EXECUTOR": "slurm",
                "SLURM_NTASKS": "4",
                "SLURM_PROCID": "3",
                "SLURM_LOCALID": "1",
                "SLURM_JOB_NODELIST": "gpu[07-08]",
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NUM_NODES": "2",
                "SLURM_NNODES": "2",
            }
        )
        _export_submitit_environment()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
        assert os.environ["MASTER_ADDR"] == "gpu07"  # the job's first node
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_shared_values_are_one_table_owned_by_each_model():
    """model.memory.share_values: every memory layer reads the model's one table (saved, counted
    and optimised once); a second model has its own (no class-level state)."""
    from pkmlm import MemoryConfig, ModelConfig, Transformer
    from pkmlm.config import OptimConfig
    from pkmlm.optim import param_groups

    def build(share: bool) -> Transformer:
        memory = MemoryConfig(layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=8, share_values=share)
        return Transformer(ModelConfig(vocab_size=64, n_layers=3, dim=32, n_heads=2, memory=memory))

    a, b, separate = build(True), build(True), build(False)
    table = a.tables_of(0).values  # what layer 0 reads: the model passes its pool explicitly
    assert a.tables_of(2).values is table is a.shared_values
    assert b.tables_of(0).values is not table
    assert [k for k in a.state_dict() if "values" in k] == ["shared_values.weight"]
    assert separate.count_parameters()["total"] - a.count_parameters()["total"] == table.weight.numel()
    assert a.count_parameters()["memory_values"] == table.weight.numel()
    groups = {g["name"]: g["params"] for g in param_groups(a, OptimConfig())}
    assert [id(p) for p in groups["memory_values"]] == [id(table.weight)]
    b.load_state_dict(a.state_dict())  # the table round-trips under its one name
    assert torch.equal(b.shared_values.weight, table.weight)
