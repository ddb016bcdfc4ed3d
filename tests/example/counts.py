"""Counting what a run of the example decodes, detects and crops, for the face cache's tests."""

from __future__ import annotations

from madlab.faces import cropping
from madlab.faces import detection as faces
from PIL import Image


class Counts:
    """From its creation on: every file opened for decoding (``PIL.Image.open``, which every
    decode of the example goes through), every face detection and every crop cut."""

    def __init__(self, monkeypatch) -> None:
        self.opened: list[str] = []
        self.detected = 0
        self.cropped = 0
        real_open, real_detect, real_crop = Image.open, cropping.detect_faces, faces.crop_with

        def open_(path, *args, **kwargs):
            self.opened.append(str(path))
            return real_open(path, *args, **kwargs)

        def detect(*args, **kwargs):
            self.detected += 1
            return real_detect(*args, **kwargs)

        def crop(*args, **kwargs):
            self.cropped += 1
            return real_crop(*args, **kwargs)

        monkeypatch.setattr(Image, "open", open_)
        monkeypatch.setattr(cropping, "detect_faces", detect)
        monkeypatch.setattr(faces, "crop_with", crop)
