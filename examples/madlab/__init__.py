"""Support package for ``examples/morph_detection.py``: a face morphing attack detector.

Sub-packages by concern, in floors: each imports only from the floors below it
(``tests/example/test_layout.py`` walks the import graph and fails on a cycle or a climb).

5. ``run``: the commands (``app``), training, scoring (``inference``, ``detector``), ``predict``,
   ``export``, the evaluation protocols, resume, speed and distributed training.
4. ``sources``: where a run's samples come from (the embedded ORL and lfw_subset sets, folders,
   CSV manifests), with faces found and splits made.
3. ``faces``: face detection, 5-point alignment and the crop policy; ``attacks``: the given morph
   methods and the synthetic ones (one registry each), the attack sets and their separability check.
2. ``data``: samples, identities, splits, folder scans, image datasets, shortcut statistics;
   ``evaluation``: ISO/IEC 30107-3 metrics, thresholds, reports and plots; ``model``: backbones
   (HF folders, timm, the hub), the detector network and its model file.
1. ``io``: the error base, atomic files, decoding pixels, cache keys and the config.

It uses only the public API of ``lora_vit``.
"""
