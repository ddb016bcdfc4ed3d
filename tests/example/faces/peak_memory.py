"""Run as a script: align one photo as a command does and print the process's peak memory in bytes.

``python peak_memory.py PHOTO data|predict``: ``data`` finds the face as ``train``/``test`` do
(:func:`~madlab.faces.cropping.find_faces`, then the 224 px crop), ``predict`` reads it as
``predict`` does (:class:`~madlab.faces.cropping.AlignedReader`). Nothing is cached. A fresh
process per photo, so that one photo's peak is not hidden under another's.
"""

from __future__ import annotations

import resource
import sys

from madlab.data.images import sample_pixels
from madlab.data.samples import DataReport, Sample
from madlab.faces.cropping import AlignedReader, find_faces

SIZE = 224


def main(path: str, command: str) -> None:
    if command == "data":
        kept = find_faces([Sample(path, 0, "bona_fide")], 0.125, None, DataReport("memory"))
        assert kept, f"no face found in {path}"
        crop = sample_pixels(kept[0], SIZE)
    else:
        crop = AlignedReader(SIZE, 0.125)(path)
    assert crop.shape == (SIZE, SIZE, 3)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: kilobytes


if __name__ == "__main__":
    main(*sys.argv[1:])
