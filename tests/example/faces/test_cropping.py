"""madlab.faces.cropping.CropPolicy: the one reader of face_crop and face_margin."""

from __future__ import annotations

from pathlib import Path

import pytest
from madlab.data.samples import DataReport, Sample
from madlab.faces.cropping import WHOLE_IMAGES, AlignedReader, CropLandmarks, CropPolicy
from madlab.io.config import Config, ConfigError


def test_the_policy_follows_face_crop_and_face_margin() -> None:
    aligned = CropPolicy.from_config(Config(face_crop="align", face_margin=0.2))
    whole = CropPolicy.from_config(Config(face_crop="none", face_margin=0.2))
    assert aligned == CropPolicy(0.2) and aligned.aligns
    assert whole == WHOLE_IMAGES and not whole.aligns
    assert isinstance(aligned.landmarks(32), CropLandmarks) and whole.landmarks(32) is None
    assert "face_margin 0.2" in aligned.describe() and "face_crop=none" in whole.describe()


def test_whole_images_leave_samples_alone_and_refuse_to_save_crops(tmp_path: Path) -> None:
    samples = [Sample("a.png", 0, "bona_fide")]
    assert WHOLE_IMAGES.crop_samples(samples, None, DataReport("t")) is samples
    assert WHOLE_IMAGES.reader(32) is None
    with pytest.raises(ConfigError, match="face_crop=none"):
        WHOLE_IMAGES.reader(32, save_crops=tmp_path / "crops")


def test_an_aligning_policy_reads_with_its_margin_and_names_crops(tmp_path: Path) -> None:
    reader = CropPolicy(0.3).reader(48, tmp_path / "cache", tmp_path / "crops", ["x/a.png", "y/a.png"])
    assert isinstance(reader, AlignedReader)
    assert (reader.size, reader.margin, reader.cache) == (48, 0.3, str(tmp_path / "cache"))
    assert reader.names == {"x/a.png": "a.png", "y/a.png": "a-2.png"}
