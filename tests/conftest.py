import os

# Tests never reach a hub: every model is built from a config here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import settings
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from vision_support import define_missing_torchvision_ops

# Before anything imports torchvision (transformers and timm do when it is installed).
define_missing_torchvision_ops()

# Inductor's graph cache (torch 2.13) does not key on the CPU vector width (docs/compile.md):
# a graph cached by a run under another ATEN_CPU_CAPABILITY would write past its buffers.
# Each capability keeps its own folder; subprocesses the tests start inherit it.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
    os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir(), f"cpu-{torch.backends.cpu.get_cpu_capability()}")

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """The example's cache (file checks, face detections, crops, pretrained backbones) in this
    session's temporary folder unless ``$LORA_VIT_CACHE`` names one: commands a test runs without
    ``--cache_dir`` never write into the user's ``~/.cache/lora-vit``."""
    given = os.environ.get("LORA_VIT_CACHE")
    if not given:
        os.environ["LORA_VIT_CACHE"] = str(tmp_path_factory.mktemp("lora-vit-cache"))
    yield
    if not given:
        os.environ.pop("LORA_VIT_CACHE", None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters empty before the test and its caches emptied after, so
    graph and graph-break counts belong to this test alone."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
