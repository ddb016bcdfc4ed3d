"""Support package for ``examples/morph_detection.py``: a face morphing attack detector.

One module per job: ``config`` (defaults and ``--override``), ``morphs`` and ``data``
(samples and splits), ``faces`` (face detection and 5-point alignment), ``cropping`` (``face_crop=align``
for a run's samples: no-face counts, cached crops), ``orl`` (the embedded ORL faces and landmark
morphs), ``identities`` (identities from file names, identity-safe splits,
leak checks), ``images`` (decoding once, the uint8 cache, loaders), ``families`` (loading the
backbones users bring: HF folders and timm), ``backbone`` (the small ViT, MAE pretraining and
domain adaptation), ``model`` (detector and freezing strategies), ``speed`` (precision and
compile), ``training``, ``inference`` (scores as float64 logits), ``metrics`` (ISO/IEC
30107-3), ``evaluation`` (thresholds, reports), ``shortcuts`` (trivial image-statistic
baselines), ``plots``, ``checkpoint``, ``files`` (the one atomic writer), ``errors`` (the one
error base) and ``app`` (the subcommands). It uses only the public API of ``lora_vit``.
"""
