"""Support package for ``examples/morph_detection.py``: a face morphing attack detector.

One module per job: ``config`` (defaults and ``--override``), ``morphs`` and ``data``
(samples, splits, loaders), ``identities`` (identities from file names, identity-safe
splits, leak checks), ``backbone`` (the small ViT, MAE pretraining, HF checkpoints),
``model`` (detector and freezing strategies), ``training``, ``inference`` (scores as
float64 logits), ``metrics`` (ISO/IEC 30107-3), ``evaluation`` (thresholds, reports),
``shortcuts`` (trivial image-statistic baselines), ``plots``, ``checkpoint``, ``files`` (the
one atomic writer), ``errors`` (the one error base) and ``app`` (the subcommands). It uses
only the public API of ``lora_vit``.
"""
