"""Support package for ``examples/morph_detection.py``: a face morphing attack detector.

One module per job: ``config`` (defaults and ``--override``), ``pixels`` (reading one image
file into RGB pixels: the data layer's leaf), ``morphs`` and ``data`` (samples and their
sources), ``faces`` (face detection and 5-point alignment), ``cropping`` (``face_crop=align`` for a
run's samples: no-face counts, cached crops), ``orl`` (the embedded ORL faces and landmark
morphs), ``splits`` (the split plan), ``identities`` (identities from file names,
identity-safe splits, leak checks), ``images`` (decoding once, the uint8 cache, loaders),
``families`` (loading the backbones users bring: HF folders and timm), ``hub`` (hub ids through
the Hugging Face cache), ``architecture`` (a backbone's architecture as JSON, for exports),
``backbone`` (the small ViT, MAE pretraining and domain adaptation), ``model`` (detector and
freezing strategies), ``speed`` (precision, compile, threads), ``training``, ``inference``
(scores as float64 logits), ``detector`` (the one scoring path: a model or export file,
loaded), ``predict`` and ``export`` (those commands), ``metrics`` (ISO/IEC 30107-3),
``evaluation`` (thresholds, operating points, reports), ``shortcuts`` (trivial image-statistic
baselines), ``plots``, ``checkpoint``, ``resume``, ``files`` (the one atomic writer),
``errors`` (the one error base) and ``app`` (the subcommands). It uses only the public API of ``lora_vit``.
"""
