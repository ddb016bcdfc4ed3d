"""Support package for ``examples/morph_detection.py``: a face morphing attack detector.

One module per job: ``config`` (defaults and ``--override``), ``morphs`` and ``data``
(samples, splits, loaders), ``backbone`` (the small ViT, MAE pretraining, HF checkpoints),
``model`` (detector and freezing strategies), ``training``, ``metrics`` (ISO/IEC 30107-3),
``evaluation`` (scores, thresholds, reports), ``plots``, ``checkpoint`` and ``app`` (the
subcommands). It uses only the public API of ``lora_vit``.
"""
