"""One way through wrappers, one load pipeline, merged weights built once, declared dependencies."""

import ast
import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from models import TimmStyleViT
from torch import nn

import lora_vit
from lora_vit import (
    LoRAError,
    LoRALinear,
    inject_lora,
    load_lora,
    load_peft_adapter,
    merge_lora,
    resolve_targets,
    save_lora,
    save_peft_adapter,
)

ROOT = Path(__file__).resolve().parents[1]


def test_inject_through_a_compile_wrapper_adapts_the_model_inside_it():
    model = TimmStyleViT()
    compiled = torch.compile(model, backend="eager")
    plain_names = [(m.module, m.slice) for m in resolve_targets(TimmStyleViT(), ["q", "v"])]
    assert [(m.module, m.slice) for m in resolve_targets(compiled, ["q", "v"])] == plain_names
    assert inject_lora(compiled, ["q", "v"], r=2, trainable=["head"]) is compiled
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert compiled(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("wrap", [nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m), backend="eager")],
                         ids=["DataParallel", "compile(DataParallel)"])
def test_every_injecting_entry_refuses_a_syncing_wrapper_with_the_same_message(wrap, tmp_path):
    base = TimmStyleViT()
    adapted = inject_lora(copy.deepcopy(base), ["blocks.0.attn.qkv"], r=2)
    lora_file = save_lora(adapted, tmp_path / "a.safetensors")
    peft_folder = save_peft_adapter(adapted, tmp_path / "peft")
    for call in (
        lambda m: inject_lora(m, ["q"]),
        lambda m: load_lora(m, lora_file),
        lambda m: load_peft_adapter(m, peft_folder),
    ):
        with pytest.raises(LoRAError, match="Inject \\(or load_lora\\) into the plain model first"):
            call(wrap(copy.deepcopy(base)))


def test_both_loaders_work_through_wrappers_once_the_adapters_are_there(tmp_path):
    base = TimmStyleViT().eval()
    source = inject_lora(copy.deepcopy(base), ["blocks.0.attn.qkv", "head"], r=2, dropout=0.0)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    expected = source(x)
    lora_file, peft_folder = save_lora(source, tmp_path / "a.safetensors"), save_peft_adapter(source, tmp_path / "p")
    for loader, where in ((load_lora, lora_file), (load_peft_adapter, peft_folder)):
        target = inject_lora(copy.deepcopy(base), ["blocks.0.attn.qkv", "head"], r=2, dropout=0.0).eval()
        loader(nn.DataParallel(target), where, adapter="default")  # a swap into the adapter of that name
        torch.testing.assert_close(target(x), expected, rtol=0, atol=0)
        fresh = copy.deepcopy(base)
        loader(torch.compile(fresh, backend="eager"), where)  # a compile wrapper may inject
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)


def test_both_loaders_refuse_another_layout_with_the_same_message(tmp_path):
    base = TimmStyleViT()
    source = inject_lora(copy.deepcopy(base), ["blocks.0.attn.qkv"], r=2)
    lora_file, peft_folder = save_lora(source, tmp_path / "a.safetensors"), save_peft_adapter(source, tmp_path / "p")
    for loader, where in ((load_lora, lora_file), (load_peft_adapter, peft_folder)):
        other = inject_lora(copy.deepcopy(base), ["blocks.0.attn.qkv"], r=4)
        with pytest.raises(LoRAError, match="already has adapters with another layout"):
            loader(other, where, adapter="default")


def test_merge_builds_every_merged_weight_once(monkeypatch):
    calls = Counter()
    original = LoRALinear.merged_weight

    def counting(self):
        calls[id(self)] += 1
        return original(self)

    monkeypatch.setattr(LoRALinear, "merged_weight", counting)
    model = inject_lora(TimmStyleViT(), ["q", "v", "o", "fc1", "fc2"], r=2)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    merge_lora(model)
    assert sorted(calls.values()) == [1] * len(layers)


def _third_party_imports(package: Path) -> set[str]:
    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "__future__"}


def test_pyproject_declares_exactly_what_the_library_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {spec.split(">")[0].split("=")[0].split("<")[0].strip() for spec in declared}
    assert names == _third_party_imports(Path(lora_vit.__file__).parent)
