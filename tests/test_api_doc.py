"""docs/api.md names every public name, and its table of what each function changes in place and
returns is checked here against the library itself, row by row."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_vit
import lora_vit.kinds

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
ROW = re.compile(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", re.M)
TABLE = {m[1]: (m[2], m[3]) for m in ROW.finditer(API.split("## What each function changes and returns")[1]
                                                  .split("\n## ")[0])}
FUNCTIONS = sorted(n for n in lora_vit.__all__
                   if inspect.isfunction(getattr(lora_vit, n)) or n in ("disable_lora", "adapter_per_sample"))


def test_every_public_name_is_documented() -> None:
    missing = [n for n in lora_vit.__all__ if f"`{n}" not in API and n not in API]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_the_table_has_one_row_per_public_function() -> None:
    assert sorted(TABLE) == FUNCTIONS
    assert all(changes.strip() and returns.strip() for changes, returns in TABLE.values())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.value, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.query(x) * self.value(x))


def snapshot(model: nn.Module) -> tuple:
    """Everything "nothing changes" promises to keep: tensors, requires_grad, module types."""
    state = [(k, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()]
    flags = [(k, p.requires_grad) for k, p in model.named_parameters()]
    return state, flags, [(k, type(m)) for k, m in model.named_modules()]


def same(a: tuple, b: tuple) -> bool:
    return (len(a[0]) == len(b[0]) and all(k1 == k2 and torch.equal(t1, t2) for (k1, t1), (k2, t2) in zip(a[0], b[0]))
            and a[1:] == b[1:])


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    base = Net()
    model = lora_vit.inject_lora(copy.deepcopy(base), ["query", "value"], r=2, trainable=["head"])
    with torch.no_grad():
        for layer in (model.query, model.value):
            layer.lora_B.normal_()
    path = lora_vit.save_lora(model, tmp_path / "a.safetensors")
    folder = lora_vit.save_peft_adapter(model, tmp_path / "peft")
    return {"base": base, "model": model, "path": path, "folder": folder, "x": torch.randn(3, 8)}


def call(name: str, s: dict) -> tuple[nn.Module, object]:
    """Run ``name`` as a user would; return the model it acted on and what it returned."""
    m, base = s["model"], s["base"]
    if name == "inject_lora":
        fresh = copy.deepcopy(base)
        return fresh, lora_vit.inject_lora(fresh, ["query"], r=2)
    if name in ("load_lora", "load_peft_adapter"):
        fresh = copy.deepcopy(base)
        return fresh, getattr(lora_vit, name)(fresh, s["path"] if name == "load_lora" else s["folder"])
    if name in ("disable_lora", "adapter_per_sample"):
        manager = (lora_vit.disable_lora(m) if name == "disable_lora"
                   else lora_vit.adapter_per_sample(m, ["default"] * 3))
        with manager as inside:
            inside(s["x"])
        return m, inside
    if name == "delete_adapter":
        m = lora_vit.inject_lora(m, ["query"], r=2, adapter="other")
        return m, lora_vit.delete_adapter(m, "other")
    if name == "register_kind":  # an equal kind again: the table keeps the one it has
        known = lora_vit.kinds.KINDS["lora"]
        return m, lora_vit.register_kind(copy.deepcopy(known))
    if name == "resolve_targets":  # under a new name: "default" is taken, which would be an error
        return m, lora_vit.resolve_targets(m, ["q", "v"], adapter="probe")
    args = {"lora_summary": (m,), "lora_state_dict": (m,), "save_lora": (m, s["path"]),
            "read_lora_metadata": (s["path"],),
            "merge_lora": (m,), "verify_lora": (m, s["x"]), "save_peft_adapter": (m, s["folder"]),
            "set_adapter": (m, "default"), "adapter_names": (m,),
            "adapter_parameters": (m,),
            "load_lora_state_dict": (m, {k: torch.zeros_like(v) for k, v in lora_vit.lora_state_dict(m).items()})}
    return m, getattr(lora_vit, name)(*args[name])


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_row_says_what_the_function_does(name: str, setup: dict) -> None:
    changes, returns = TABLE[name]
    before = snapshot(setup["model"])
    model, result = call(name, setup)
    if returns.startswith("`model` (the same object)") or "yielding `model`" in returns:
        assert result is model, f"{name} returned another object"
    else:
        assert result is not model
    if changes.startswith("nothing"):
        assert same(before, snapshot(setup["model"])), f"{name} changed the model"
    elif name not in ("inject_lora", "load_lora", "load_peft_adapter", "delete_adapter"):  # those act on a new model
        # set_adapter records a choice, which is no tensor; the others must change the model's state.
        assert not same(before, snapshot(model)) or name == "set_adapter", f"{name} changed nothing"
