"""LoRA for PyTorch models, sharpest on Vision Transformers.

Adapt a model with :func:`inject_lora`, train it, save only the adapters with
:func:`save_lora`, load them onto a fresh base model with :func:`load_lora`, or fold them
into the weights with :func:`merge_lora`. A model may hold several named adapters
(``inject_lora(..., adapter="name")``, :func:`set_adapter`, :func:`delete_adapter`) and run a
batch mixed across them with :func:`adapter_per_sample`.
"""

from ._version import __version__
from .errors import LoRAError
from .inject import LoRASummary, inject_lora, lora_summary
from .io import load_lora, read_lora_metadata, save_lora
from .kinds import AdapterKind, register_kind
from .layer import LoRALinear, LoRASlice
from .merge import merge_lora
from .mha import LoRAMultiheadAttention
from .named import adapter_parameters, adapter_per_sample, delete_adapter, set_adapter
from .peft_compat import load_peft_adapter, save_peft_adapter
from .registry import adapter_names
from .spec import AdapterSpec
from .state import LoadResult, load_lora_state_dict, lora_state_dict
from .targets import LOGICAL_TARGETS, PRESETS, resolve_targets
from .toggle import disable_lora
from .verify import verify_lora

__all__ = [
    "LOGICAL_TARGETS",
    "PRESETS",
    "AdapterKind",
    "AdapterSpec",
    "LoRAError",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRASlice",
    "LoRASummary",
    "LoadResult",
    "__version__",
    "adapter_names",
    "adapter_parameters",
    "adapter_per_sample",
    "delete_adapter",
    "disable_lora",
    "inject_lora",
    "load_lora",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_state_dict",
    "lora_summary",
    "merge_lora",
    "read_lora_metadata",
    "register_kind",
    "resolve_targets",
    "save_lora",
    "save_peft_adapter",
    "set_adapter",
    "verify_lora",
]
