"""Two CPU processes (gloo, localhost) train the same adapters as one process on the same global batch.

The training code is the recipe in docs/distributed.md, extracted and run as written, so the
documentation cannot drift from what works.
"""

import contextlib
import copy
import importlib.util
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import TimmStyleViT
from safetensors.torch import load_file, save_file

from lora_vit import (
    LoRAError,
    adapter_parameters,
    adapter_per_sample,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    lora_summary,
    merge_lora,
    save_lora,
    set_adapter,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
# Each rank's share of the global batch of 8, per sample; rank 1 never routes through "b".
ROUTES = [["a", "b", None, "b"], ["a", None, "a", "a"]]
DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def recipe_module(folder: Path):
    """docs/distributed.md's python block, written to ``folder`` and imported as ``distributed_recipe``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/distributed.md should hold exactly one python block: the recipe"
    (folder / "distributed_recipe.py").write_text(blocks[0])
    spec = importlib.util.spec_from_file_location("distributed_recipe", folder / "distributed_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model():
    torch.manual_seed(0)
    return TimmStyleViT(dim=16, depth=1, heads=2, num_classes=2)


def make_data(rank, world):
    """The same global batches everywhere; each rank gets its contiguous share of every batch."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
                torch.randn(GLOBAL_BATCH, 2, generator=generator)) for _ in range(STEPS)]
    share = GLOBAL_BATCH // world
    return [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in batches]


def _worker(rank, port, folder):
    """One rank: the DDP and FSDP recipes, plus the wrapper checks that need a live process group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        sys.path.insert(0, folder)
        import distributed_recipe as recipe

        out = Path(folder)
        ddp = recipe.train_ddp(rank, make_model, make_data, out / "ddp.safetensors", steps=STEPS)
        plain = ddp.module
        wrapped_state, plain_state = lora_state_dict(ddp), lora_state_dict(plain)
        assert list(wrapped_state) == list(plain_state)
        assert all(wrapped_state[k] is not None and torch.equal(wrapped_state[k], plain_state[k]) for k in plain_state)
        assert str(lora_summary(ddp)) == str(lora_summary(plain))
        trainable_bytes = sum(p.numel() * p.element_size() for p in plain.parameters() if p.requires_grad)
        logged = ddp._get_ddp_logging_data()
        assert logged["total_parameter_size_bytes"] == trainable_bytes, logged  # only adapters + head sync
        # load_lora / load_lora_state_dict into the wrapped model (adapters already there) work too.
        load_lora(ddp, out / "ddp.safetensors")
        load_lora_state_dict(ddp, plain_state)
        try:
            inject_lora(ddp, ["fc1"])
        except LoRAError as err:
            assert "Inject (or load_lora) into the plain model first, then wrap it" in str(err)
        else:
            raise AssertionError("inject_lora into a DDP wrapper must be refused")

        recipe.train_one_of_several(rank, make_model, make_data, out / "one_of_two.safetensors", steps=STEPS)
        recipe.train_mixed(rank, make_model, make_data, ROUTES[rank], out, steps=STEPS)

        fsdp, state = recipe.train_fsdp(rank, make_model, make_data, out / "fsdp.safetensors", steps=STEPS)
        try:
            lora_state_dict(fsdp)  # outside summon_full_params: shards
        except LoRAError as err:
            assert "summon_full_params" in str(err)
        else:
            raise AssertionError("lora_state_dict of a sharded FSDP model must be refused")
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / "fsdp_state.safetensors"))
        dist.barrier()
    except BaseException:
        (Path(folder) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(folder: Path, timeout: float = 120.0) -> None:
    context = mp.start_processes(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {WORLD}-process run did not finish in {timeout} s")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(folder.glob("error*.txt")))
        raise AssertionError(f"a rank failed:\n{errors}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _one_process(recipe_steps: int) -> dict[str, torch.Tensor]:
    """The same training in this process on the whole global batch."""
    model = inject_lora(make_model(), targets=["q", "v"], r=2, dropout=0.0, trainable=["head"])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for x, y in make_data(0, 1)[:recipe_steps]:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return lora_state_dict(model)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    recipe_module(folder)  # fails here, clearly, if the doc's block does not even import
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        _run_two_ranks(folder)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return folder


def test_ddp_adapters_match_one_process_on_the_same_global_batch(two_rank_run):
    reference = _one_process(STEPS)
    base = make_model()
    loaded = load_lora(copy.deepcopy(base), two_rank_run / "ddp.safetensors")
    got = lora_state_dict(loaded)
    assert list(got) == list(reference)  # no "module." anywhere
    initial = inject_lora(make_model(), targets=["q", "v"], r=2, dropout=0.0, trainable=["head"])
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.equal(value, lora_state_dict(initial)[key]), f"{key} did not train"


def test_fsdp_adapters_match_one_process_on_the_same_global_batch(two_rank_run):
    reference = _one_process(STEPS)
    state = load_file(str(two_rank_run / "fsdp_state.safetensors"))
    assert sorted(state) == sorted(reference)  # safetensors files keep keys sorted
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    loaded = load_lora(make_model(), two_rank_run / "fsdp.safetensors")
    for key, value in lora_state_dict(loaded).items():
        assert torch.equal(value, state[key])


def test_merge_through_a_compile_wrapper_gives_the_plain_merge():
    # torch.compile's wrapper (OptimizedModule) is seen through like DDP, without a process group.
    model = inject_lora(make_model(), ["q", "v"], r=2, dropout=0.0, trainable=["head"]).eval()
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.normal_(0, 0.1)
    compiled = torch.compile(model)
    assert list(lora_state_dict(compiled)) == list(lora_state_dict(model))
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    plain_copy = copy.deepcopy(model)
    merge_lora(compiled)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge_lora(plain_copy)(x), expected, rtol=1e-5, atol=1e-5)


def test_save_lora_through_a_data_parallel_wrapper_has_plain_keys(tmp_path):
    model = inject_lora(make_model(), ["q"], r=2, trainable=["head"])
    path = save_lora(torch.nn.DataParallel(model), tmp_path / "dp.safetensors")
    loaded = load_lora(make_model(), path)
    assert list(lora_state_dict(loaded)) == list(lora_state_dict(model))


def _two_adapters():
    model = inject_lora(make_model(), targets=["q", "v"], r=2, dropout=0.0, adapter="a")
    return inject_lora(model, targets=["q", "v"], r=2, dropout=0.0, adapter="b")


def _train_alone(model, parameters, routes=None):
    optimiser = torch.optim.AdamW(parameters, lr=1e-2)
    for x, y in make_data(0, 1)[:STEPS]:
        routing = adapter_per_sample(model, routes) if routes else contextlib.nullcontext()
        with routing:
            loss = torch.nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model


def test_ddp_trains_one_adapter_of_two_like_one_process_and_leaves_the_other(two_rank_run):
    reference = set_adapter(_two_adapters(), "b")
    initial_a = {k: v.clone() for k, v in lora_state_dict(reference, adapter="a").items()}
    _train_alone(reference, adapter_parameters(reference, "b"))
    got = load_lora(make_model(), two_rank_run / "one_of_two.safetensors")
    assert list(lora_state_dict(got)) == list(lora_state_dict(reference, adapter="b"))
    for key, value in lora_state_dict(reference, adapter="b").items():
        torch.testing.assert_close(lora_state_dict(got)[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in lora_state_dict(reference, adapter="a").items():
        assert torch.equal(value, initial_a[key])  # the frozen adapter did not move in the reference either


def test_ddp_mixed_batches_train_every_adapter_like_one_process(two_rank_run):
    global_routes = ROUTES[0] + ROUTES[1]
    reference = _two_adapters()
    initial = {name: {k: v.clone() for k, v in lora_state_dict(reference, adapter=name).items()} for name in ("a", "b")}
    _train_alone(reference, [p for p in reference.parameters() if p.requires_grad], global_routes)
    for name in ("a", "b"):
        got = lora_state_dict(load_lora(make_model(), two_rank_run / f"{name}.safetensors"))
        for key, value in lora_state_dict(reference, adapter=name).items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
            assert not torch.equal(value, initial[name][key]), f"adapter {name} {key} did not train"
