"""No silent state: which adapter runs, what trains, what PEFT loads are named, standalone layers, routing per call."""

import asyncio
import contextlib
import copy
import threading

import pytest
import torch
from models import PlainNet, TimmStyleViT, randomise
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import (
    LoRAError,
    LoRALinear,
    adapter_names,
    adapter_parameters,
    adapter_per_sample,
    delete_adapter,
    inject_lora,
    load_lora,
    load_peft_adapter,
    merge_lora,
    save_lora,
    save_peft_adapter,
    set_adapter,
    verify_lora,
)

torch.manual_seed(0)
BASE = TimmStyleViT(dim=32, depth=2, heads=4).eval()
X = torch.randn(4, 3, 32, 32)



def adapted(name, seed, base=BASE, **kwargs):
    model = inject_lora(copy.deepcopy(base), kwargs.pop("targets", ["q", "v"]), r=2, dropout=0.0, adapter=name,
                        **kwargs)
    randomise(model, name, seed)
    return model.eval()


# --- the running adapter -----------------------------------------------------------------------


def test_after_deleting_the_last_adapter_a_new_one_runs(tmp_path):
    model = adapted("v1", 1)
    delete_adapter(model, "v1")
    inject_lora(model, ["q", "v"], r=2, dropout=0.0, adapter="v2")
    randomise(model, "v2", 2)
    with torch.no_grad():
        assert not torch.equal(model(X), BASE(X))  # v2 runs, not the bare backbone
        set_adapter(model, "v2")
        chosen = model(X)
        forget = copy.deepcopy(model)
    # The hot redeploy through files: retire v1, load v2.
    served = load_lora(copy.deepcopy(BASE), save_lora(adapted("v1", 1), tmp_path / "v1.safetensors"))
    delete_adapter(served, "v1")
    load_lora(served, save_lora(forget, tmp_path / "v2.safetensors"))
    assert adapter_names(served) == ("v2",)
    with torch.no_grad():
        assert torch.equal(served(X), chosen)


@pytest.mark.parametrize(("steps", "runs"), [
    ([("inject", "a"), ("inject", "b")], "a"),  # the first added
    ([("inject", "a"), ("inject", "b"), ("set", "b"), ("delete", "b")], "a"),  # chosen and deleted: the first left
    ([("inject", "a"), ("inject", "b"), ("set", "b"), ("delete", "a")], "b"),  # the choice stays
    ([("inject", "a"), ("set", None), ("inject", "b")], None),  # the base, as chosen
    ([("inject", "a"), ("set", None), ("delete", "a"), ("inject", "b")], "b"),  # an emptied model forgets
    ([("inject", "a"), ("delete", "a"), ("inject", "b"), ("inject", "c")], "b"),
    ([("inject", "a"), ("inject", "b"), ("set", "b"), ("merge", "b")], "b"),
])
def test_the_running_adapter_after_any_sequence_is_what_the_docs_say(steps, runs):
    model = copy.deepcopy(BASE)
    for seed, (op, name) in enumerate(steps):
        if op == "inject":
            inject_lora(model, ["q", "v"], r=2, dropout=0.0, adapter=name)
            randomise(model, name, seed)
        elif op == "set":
            set_adapter(model, name)
        elif op == "delete":
            delete_adapter(model, name)
        else:
            merged = copy.deepcopy(model)
            set_adapter(merged, name)
            with torch.no_grad():
                expected = merged(X)
            model = merge_lora(model, adapter=name, discard_others=True)
            with torch.no_grad():
                torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)  # merging: fp32 rounding
            return
    with torch.no_grad():
        got = model(X)
        set_adapter(model, runs)
        assert torch.equal(got, model(X))


# --- requires_grad -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["inject", "load"])
def test_adding_an_adapter_changes_requires_grad_of_its_own_parameters_only(how, tmp_path):
    model = adapted("a", 1, trainable=["head"])
    for param in adapter_parameters(model, "a"):
        param.requires_grad_(False)  # the user froze adapter a and its head ...
    assert not model.head.per_adapter["a"].weight.requires_grad
    model.norm.weight.requires_grad_(True)  # ... and unfroze a base norm
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    if how == "inject":
        inject_lora(model, ["v", "fc1"], r=2, trainable=["head"], adapter="b")
    else:
        source = adapted("b", 2, targets=["v", "fc1"], trainable=["head"])
        load_lora(model, save_lora(source, tmp_path / "b.safetensors"))
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: after[n] for n in before} == before  # nothing that was there changed
    new = set(after) - set(before)
    assert new and all(n.endswith("__b") or n.startswith("head.per_adapter.b.") for n in new)
    assert all(after[n] for n in new)


# --- PEFT names --------------------------------------------------------------------------------


def test_a_second_peft_folder_never_silently_replaces_the_first(tmp_path):
    base = PlainNet().eval()
    x = torch.randn(3, 12)
    folders = []
    for seed in (1, 2):
        source = adapted("default", seed, base=base, targets=["stem"])
        folders.append((save_peft_adapter(source, tmp_path / f"p{seed}"), source(x)))
    model = load_peft_adapter(copy.deepcopy(base), folders[0][0])
    with pytest.raises(LoRAError, match=r"which the model already has \(\['default'\]\); pass adapter=<a new name>"):
        load_peft_adapter(model, folders[1][0])
    load_peft_adapter(model, folders[1][0], adapter="second")
    with torch.no_grad():
        assert torch.equal(model(x), folders[0][1])
        set_adapter(model, "second")
        assert torch.equal(model(x), folders[1][1])
    # PEFT writes adapter 'x' of a multi-adapter save into subfolder 'x': that is its name.
    nested = save_peft_adapter(adapted("default", 3, base=base, targets=["stem"]), tmp_path / "p1" / "studio")
    load_peft_adapter(model, nested)
    assert adapter_names(model) == ("default", "second", "studio")


# --- a standalone layer ------------------------------------------------------------------------


def test_every_operation_on_a_standalone_layer_works_or_raises_lora_error(tmp_path):
    layer = LoRALinear(nn.Linear(6, 6), r=2, dropout=0.0, adapter="a")
    layer.add_adapter("b", layer.adapter("a").spec)
    with torch.no_grad():
        layer.lora_B__b.fill_(0.5)
    keys = set(layer.state_dict())
    x = torch.randn(3, 6)
    set_adapter(layer, "b")
    with torch.no_grad():
        b_out = layer(x)
        with adapter_per_sample(layer, ["a", "b", None]):
            mixed = layer(x)
    torch.testing.assert_close(mixed[1], b_out[1], rtol=1e-6, atol=1e-6)  # bmm vs mm: float rounding
    delete_adapter(layer, "b")
    assert set(layer.state_dict()) == {k for k in keys if not k.endswith("__b")}
    assert layer.adapter_names == ("a",) and adapter_names(layer) == ("a",)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    with pytest.raises(LoRAError, match="cannot delete 'a', the last adapter of this LoRALinear"):
        delete_adapter(layer, "a")
    assert set(layer.state_dict()) == {k for k in keys if not k.endswith("__b")}  # no junk keys
    with pytest.raises(LoRAError):
        delete_adapter(layer, "zz")
    assert set(verify_lora(layer, x)) == {""}  # the layer's own adapter is checked, not taken for noise
    path = save_lora(layer, tmp_path / "a.safetensors")
    load_lora(layer, path, adapter="c")  # added beside
    assert layer.adapter_names == ("a", "c") and "lora_A__c" in layer.state_dict()
    plain = nn.Linear(6, 6)
    with pytest.raises(LoRAError, match="adapts the model itself"):
        load_lora(plain, path, check_base=False)
    assert set(plain.state_dict()) == {"weight", "bias"}
    with pytest.raises(LoRAError, match="no module name for PEFT's keys"):
        save_peft_adapter(layer, tmp_path / "peft", adapter="a")
    assert type(merge_lora(layer, adapter="a", discard_others=True)) is nn.Linear


# --- routing per call --------------------------------------------------------------------------


def routed_model():
    model = adapted("a", 1)
    inject_lora(model, ["q", "k", "v"], r=3, dropout=0.0, adapter="b")
    randomise(model, "b", 2)
    return model.eval()


def expected_for(model, mix):
    rows = []
    with torch.no_grad():
        for i, name in enumerate(mix):
            single = copy.deepcopy(model)
            set_adapter(single, name)
            rows.append(single(X[i : i + 1]))
    return torch.cat(rows)


MIXES = [["a", "b", None, "a"], ["b", "b", "a", None], [None, None, "b", "b"], ["a", "a", "a", "a"]]


@pytest.mark.parametrize("compiled", [False, True])
def test_threads_routing_different_mixes_concurrently_each_get_their_own(compiled, fresh_dynamo):
    model = routed_model()
    expected = [expected_for(model, mix) for mix in MIXES]
    plain = expected_for(model, ["a"] * 4)
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    start = threading.Barrier(len(MIXES))  # 3 routing threads and 1 unrouted start together
    errors: list[str] = []

    def worker(k):
        start.wait(timeout=60)
        for _ in range(15):
            with torch.no_grad(), adapter_per_sample(model, MIXES[k]):
                got = run(X)
            if not torch.allclose(got, expected[k], rtol=1e-5, atol=1e-5):  # bmm vs mm: float rounding
                errors.append(f"thread {k}: wrong rows")

    def unrouted():  # a thread with no block sees none of the others'
        start.wait(timeout=60)
        for _ in range(15):
            with torch.no_grad():
                if not torch.allclose(run(X), plain, rtol=1e-5, atol=1e-5):
                    errors.append("unrouted thread was routed")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(MIXES) - 1)]
    threads.append(threading.Thread(target=unrouted))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    if compiled:
        assert dict(counters["graph_break"]) == {}


def test_asyncio_tasks_interleaving_inside_blocks_each_get_their_own():
    model = routed_model()
    expected = [expected_for(model, mix) for mix in MIXES[:2]]

    async def task(k, results):
        with adapter_per_sample(model, MIXES[k]):
            await asyncio.sleep(0)  # the other task enters its block meanwhile
            with torch.no_grad():
                results[k] = model(X)
            await asyncio.sleep(0)

    async def both():
        results = {}
        await asyncio.gather(task(0, results), task(1, results))
        return results

    results = asyncio.run(both())
    for k in range(2):
        torch.testing.assert_close(results[k], expected[k], rtol=1e-5, atol=1e-5)  # bmm vs mm: float rounding


def test_blocks_left_in_any_order_restore_what_was_there():
    model = routed_model()
    with torch.no_grad():
        plain = model(X)
        first, second = adapter_per_sample(model, MIXES[0]), adapter_per_sample(model, MIXES[1])
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # not the innermost
        torch.testing.assert_close(model(X), expected_for(model, MIXES[1]), rtol=1e-5, atol=1e-5)
        second.__exit__(None, None, None)
        assert torch.equal(model(X), plain)


def test_adding_deleting_or_merging_inside_a_block_is_refused(tmp_path):
    model = routed_model()
    path = save_lora(model, tmp_path / "a.safetensors", adapter="a")
    with adapter_per_sample(model, MIXES[0]):
        for call in (
            lambda: inject_lora(model, ["fc1"], r=2, adapter="c"),
            lambda: load_lora(model, path, adapter="a2"),
            lambda: delete_adapter(model, "b"),
            lambda: merge_lora(model, adapter="a", discard_others=True),
        ):
            with pytest.raises(LoRAError, match="adapter_per_sample block"):
                call()
        # On another thread too: the routes index the adapters as they were on entering.
        failure = []
        thread = threading.Thread(target=lambda: failure.append(_raises(lambda: delete_adapter(model, "b"))))
        thread.start()
        thread.join()
        assert failure == [True]
        with torch.no_grad():
            torch.testing.assert_close(model(X), expected_for(model, MIXES[0]), rtol=1e-5, atol=1e-5)
    assert adapter_names(model) == ("a", "b")
    load_lora(model, path, adapter="a2")  # fine once the block is left


def _raises(call):
    with contextlib.suppress(LoRAError):
        call()
        return False
    return True


def test_compiled_nested_and_unrouted_calls_reuse_their_graphs(fresh_dynamo):
    model = routed_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for mix in MIXES:
            with adapter_per_sample(model, mix):
                torch.testing.assert_close(compiled(X), model(X), rtol=1e-5, atol=1e-5)
        assert torch.equal(compiled(X), model(X))
    assert counter.frame_count == 2  # one routed graph for every mix, one unrouted
    assert dict(counters["graph_break"]) == {}
