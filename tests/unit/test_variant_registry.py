"""The memory-variant registry (pkmlm/model/variants): every registered kind builds and counts the
table parameters a token really reads; presets name their variant; `model.memory.kind` is checked;
a variant registered here, in this file only, is built, counted, named and refused by the HF export
without an edit anywhere else; exports saved by main before the registry load with main's logits."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from pkmlm.checkpoint.hf_export import check_hf_exportable
from pkmlm.errors import ConfigError, UserError
from pkmlm.experiments.report import variant_name
from pkmlm.finetune.config import init_from_mismatch
from pkmlm.metrics.flops import memory_layer_costs
from pkmlm.model import MemoryConfig, ModelConfig, ProductKeyMemory, Transformer, variants
from pkmlm.model.variants import MemoryVariant
from pkmlm.run import load_run

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "main_exports"  # tests/fixtures/
DIM = 12
SMALL = dict(n_keys=8, heads=1, knn=3, k_dim=6, query_norm="none")


def _layer(seed: int = 0, **options) -> ProductKeyMemory:
    torch.manual_seed(seed)
    return ProductKeyMemory(DIM, **SMALL, **options)


@pytest.mark.parametrize("variant", [v for v in variants.registered() if not v.side_name], ids=lambda v: v.kind)
def test_every_registered_kind_builds_and_counts_the_table_parameters_a_token_reads(variant):
    """One token, one head: the rows of every table that get a gradient are the K rows read, so
    their parameters are exactly what `read_params` (active parameters, FLOPs) counts."""
    assert variants.kind_of({"layers": [0], **variant.example}) == variant.kind
    layer = _layer(**variant.example)
    assert variant.active(layer) or variant.kind == "pkm"
    out = layer(torch.randn(1, DIM))
    out.pow(2).sum().backward()
    read = sum(int((t.weight.grad != 0).any(1).sum()) * t.weight.shape[1] for t in layer.own_tables() if t is not None)
    assert read == layer.read_params()
    costs = memory_layer_costs(layer)
    assert costs["params"] == sum(p.numel() for p in layer.parameters())
    assert costs["value_params"] == SMALL["n_keys"] ** 2 * (layer.v_dim + (variants.down_dim(layer, DIM) or 0))
    assert variants.get(variant.kind) is variant


@pytest.mark.parametrize("variant", variants.side_variants(), ids=lambda v: v.kind)
def test_every_side_layer_kind_builds_beside_its_blocks_and_counts_what_a_token_reads(variant):
    """A variant that is not a product-key memory (`side_name`): its `SideLayer` sits at
    `blocks.<i>.<side_name>` of the layers its example names, and nowhere in a model without its
    options; one token's gradient reaches exactly the table entries its counts call active; the
    model's counts, FLOPs and optimizer groups take it in without naming it."""
    from pkmlm.optim import OptimConfig, param_groups, use_sparse_value_grads

    memory = {"layers": [], **variant.example}
    assert variants.kind_of(memory) == variant.kind and variant.side_layers(memory)
    cfg = ModelConfig(vocab_size=32, n_layers=2, dim=DIM, n_heads=2, max_seq_len=8)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    cfg.memory = MemoryConfig(**memory)
    model = Transformer(cfg)
    names = {f"blocks.{i}.{variant.side_name}" for i in variant.side_layers(memory)}
    assert set(model.side_layers()) == names and plain.side_layers() == {}
    extra = {k for k in model.state_dict() if not any(k.startswith(n + ".") for n in names)}
    assert extra == set(plain.state_dict())  # the rest of the model is the model without it
    use_sparse_value_grads(model)
    model(torch.tensor([[3]]), torch.tensor([[4]]))[1].backward()
    counts = model.count_parameters()
    for side in model.side_layers().values():
        own = side.count_parameters()
        (table,) = side.table_parameters()
        read = int(table.grad.coalesce().indices()[0].unique().numel()) * table.shape[1]
        assert own["active"] == own["total"] - own["tables"] + read
        assert own["total"] == sum(p.numel() for p in side.parameters())
    side_counts = [s.count_parameters() for s in model.side_layers().values()]
    assert counts["side_tables"] == counts["memory_values"] == sum(c["tables"] for c in side_counts)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    dense_flops = plain.flops_per_token(8) - 6 * 0
    assert model.flops_per_token(8) == dense_flops + sum(s.flops_per_token() for s in model.side_layers().values())
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-3))}
    side_group = groups["side_tables"]
    assert side_group["weight_decay"] == 0.0
    assert side_group["lr"] == pytest.approx(1e-3 * next(iter(model.side_layers().values())).tables_lr_mult)
    assert {id(p) for p in side_group["params"]} == {
        id(p) for s in model.side_layers().values() for p in s.table_parameters()
    }


@pytest.mark.parametrize(
    "preset, kind",
    [
        ("tiny", "pkm"),
        ("paper", "pkm"),
        ("small", "pkm"),
        ("pkm_parallel", "pkm"),
        ("memory_plus", "memory_plus"),
        ("peer", "peer"),
        ("ultramem", "ultramem"),
        ("engram", "engram"),
    ],
)
def test_each_preset_names_its_registered_variant(preset, kind):
    memory = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(MemoryConfig), OmegaConf.load(ROOT / "configs/memory" / f"{preset}.yaml"))
    )
    assert variants.kind_of(memory) == kind
    memory.kind = kind  # stating the kind the options describe is accepted
    memory.validate()


def test_kind_is_null_a_registered_kind_the_options_describe_or_refused():
    MemoryConfig(layers=[0], values_kind="peer").validate()  # null: named by the options
    MemoryConfig(layers=[0], values_kind="peer", kind="peer").validate()
    with pytest.raises(ConfigError, match=r"model.memory.kind.*the options describe 'pkm'"):
        MemoryConfig(layers=[0], kind="peer").validate()
    with pytest.raises(
        ConfigError, match=r"model.memory.kind.*null or one of pkm\|peer\|memory_plus\|ultramem\|engram$"
    ):
        MemoryConfig(layers=[0], kind="hash_layer").validate()
    with pytest.raises(ConfigError, match=r"model.memory.kind.*the options describe 'pkm'"):
        MemoryConfig(layers=[0], kind="engram").validate()
    with pytest.raises(TypeError, match="unknown memory option"):
        ProductKeyMemory(DIM, **SMALL, gates="silu")


@pytest.mark.parametrize("name", ["pkm", "everything_shared"])
def test_an_export_saved_by_main_before_the_registry_loads_with_mains_logits(name):
    """No `kind` in its config.json; the same parameter names, the same forward."""
    assert "kind" not in json.loads((FIXTURES / name / "config.json").read_text())["model_config"]["memory"]
    recorded = json.loads((FIXTURES / "logits.json").read_text())
    run = load_run(FIXTURES / name)
    assert run.model.cfg.memory.kind is None
    with torch.no_grad():
        logits = run.model(torch.tensor(recorded["ids"]))[0][0, -1]
    torch.testing.assert_close(logits, torch.tensor(recorded["logits"][name]), rtol=1e-5, atol=1e-5)
    # ... and is a valid init_from source for a finetune of the same model (kind null here, absent there).
    saved = json.loads((FIXTURES / name / "config.json").read_text())["model_config"]
    assert init_from_mismatch(str(FIXTURES / name), run.model.cfg, saved) is None


# --- a variant of this file's own: registered here, no edit anywhere else --------------------------


@dataclass
class ReadBiasFields:
    read_bias: bool = False  # a learned bias added to the layer's read


class ReadBias(MemoryVariant):
    """A real, tiny variant: out = read + b, with b a learned `(out_dim,)` parameter."""

    kind = "read_bias"
    display_name = "Biased PKM"
    precedence = 50
    Fields = ReadBiasFields
    example = {"read_bias": True}

    @classmethod
    def describes(cls, memory: Any) -> bool:
        return bool(variants.option(memory, "read_bias"))

    @classmethod
    def check(cls, memory: Any, prefix: str) -> None:
        if not isinstance(memory.read_bias, bool):
            raise ConfigError(f"{prefix}.read_bias", memory.read_bias, "true or false")

    @classmethod
    def active(cls, layer: Any) -> bool:
        return layer.read_bias_param is not None

    @classmethod
    def macs(cls, layer: Any) -> Dict[str, int]:
        return {"read_bias": 0}  # an add, no multiply

    @classmethod
    def build_output(cls, layer: Any) -> None:
        layer.read_bias_param = nn.Parameter(torch.zeros(layer.out_dim)) if layer.read_bias else None

    @classmethod
    def output(cls, layer: Any, x_ND: Tensor, out_NV: Tensor) -> Tensor:
        return out_NV + layer.read_bias_param


@pytest.fixture
def read_bias():
    variants.register(ReadBias)
    try:
        yield ReadBias
    finally:
        variants.unregister(ReadBias.kind)


def test_a_variant_registered_in_a_test_needs_no_edit_elsewhere(read_bias):
    plain, biased = _layer(3), _layer(3, read_bias=True)
    assert "read_bias_param" not in dict(plain.named_parameters()) and plain.read_bias_param is None
    with torch.no_grad():
        biased.read_bias_param.fill_(0.5)
    x = torch.randn(4, DIM)
    # Built after the values (no RNG drawn): the same 2019 layer underneath, plus its bias.
    torch.testing.assert_close(biased(x), plain(x) + 0.5, rtol=0, atol=0)
    assert sum(p.numel() for p in biased.parameters()) == sum(p.numel() for p in plain.parameters()) + DIM
    assert memory_layer_costs(biased)["read_bias"] == 0 and "read_bias" in memory_layer_costs(biased)
    assert "read_bias=True" in repr(biased)
    # Named by the registry: kind, report label, and refused by the HF export (not in modeling_pkmlm.py).
    saved = {"layers": [1], "placement": "replace", "read_bias": True}
    assert variants.kind_of(saved) == "read_bias" and variant_name(saved) == "Biased PKM (replace)"
    with pytest.raises(UserError, match=r"--format hf:.*read_bias: read_bias"):
        check_hf_exportable({"memory": saved})
    check_hf_exportable({"memory": {**saved, "read_bias": False}})
    # Its options reach a config schema that inherits them (as MemoryConfig inherits every variant
    # registered when pkmlm.model.variants is imported), and validate runs its check.
    config = dataclasses.make_dataclass("WithReadBias", [], bases=(ReadBiasFields, MemoryConfig))
    with pytest.raises(ConfigError, match="model.memory.read_bias"):
        config(layers=[0], read_bias="yes").validate()
    config(layers=[0], read_bias=True, kind="read_bias").validate()
    # And a model of it trains: the gradient reaches the bias through the transformer.
    cfg = ModelConfig(vocab_size=32, n_layers=2, dim=DIM, n_heads=2, max_seq_len=8)
    cfg.memory = config(layers=[1], read_bias=True, **SMALL)
    model = Transformer(cfg)
    idx = torch.randint(0, 32, (2, 6))
    model(idx, idx)[1].backward()
    assert model.memory_layers()[1].read_bias_param.grad.abs().sum() > 0


def test_no_module_outside_the_variants_names_a_variant_or_its_options():
    """Outside pkmlm/model/variants/, no code (docstrings and comments aside) holds a registered
    kind or a variant's option name as a string, or reads an option from a memory config or layer
    (`memory.gate`, ...); checkpoint/modeling_pkmlm.py is the stated exception (docs/architecture.md:
    the standalone Hugging Face file)."""
    import ast

    package = ROOT / "src" / "pkmlm"
    kinds = {v.kind for v in variants.registered()}
    names = kinds | set(variants.option_defaults())
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("model/variants/") or rel == "checkpoint/modeling_pkmlm.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Attribute) and ast.unparse(node.value).split(".")[-1] in ("memory", "mem", "m"):
                text = node.attr  # a variant's option read from a memory config or layer
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            if text in names:
                found.append(f"{rel}:{node.lineno} {text!r}")
            # nor imports a variant's module (its names reach the rest only through the registry)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pkmlm.model.variants."):
                found.append(f"{rel}:{node.lineno} imports {node.module}")
        # nor is named after one (a module of its own outside variants/, e.g. metrics/<kind>_usage.py)
        found += [f"{rel}: file name" for kind in kinds if kind in path.stem.split("_") and kind != "pkm"]
    assert found == []
