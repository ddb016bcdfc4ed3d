"""Backbones named by Hugging Face hub id (``facebook/dinov2-small``, ``timm/vit_small_patch14_dinov2.lvd142m``).

An id is resolved through ``huggingface_hub``'s own cache (``$HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``): online, the first use downloads the checkpoint files once;
offline (``HF_HUB_OFFLINE=1``, or no network) a filled cache is used as it is. The snapshot
folder it returns is an ordinary checkpoint folder, loaded like a local one, and its name is
the commit it holds: that revision goes into the model file, so ``test`` and ``predict``
rebuild the detector from the very same weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..io.errors import MadlabError

__all__ = ["HubError", "is_hub_id", "resolve"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Names ending so are files, never repositories (a hub id may contain dots: timm/vit_small.lvd142m).
_FILE_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".json", ".h5", ".npz", ".msgpack")
# Only what a vision checkpoint needs: configs and safetensors weights (never pickles).
_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


class HubError(MadlabError):
    """A hub id that cannot be resolved; the message names it and how to fetch it."""


def is_hub_id(source: str) -> bool:
    """Whether ``source`` is a hub id: it reads as ``owner/name``, names no local file or folder,
    and does not look like a path.

    Some text is a path whatever exists: ``./x``, ``~/x``, ``/abs/x``, ``a/b/c``, ``a\\b``, a
    trailing ``/``, or a name ending like a weights or config file (``x/model.safetensors``).
    ``owner/name`` whose ``owner`` is a local folder is a path too: a mistyped folder there must
    be reported as missing, not looked up on the hub. An existing local ``owner/name`` wins over
    the hub id of the same spelling.
    """
    if not _HUB_ID.match(source) or source.lower().endswith(_FILE_ENDINGS):
        return False
    return not Path(source).exists() and not Path(source.split("/")[0]).is_dir()


def resolve(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """The local snapshot folder of ``repo_id`` (downloaded once if the hub can be reached) and its commit.

    Args:
        repo_id: ``owner/name`` on the Hugging Face hub.
        revision: A commit, branch or tag; ``None`` for the default branch.

    Raises:
        HubError: If ``huggingface_hub`` is missing, or the id is not cached and cannot be
            downloaded (offline, unknown id, no access); the message says how to fetch it.
    """
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as err:  # pragma: no cover - transformers depends on it
        raise HubError(f"--backbone {repo_id} needs huggingface_hub (pip install huggingface_hub): {err}") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS))
    except Exception as err:
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")
        where = constants.HF_HUB_CACHE
        at = f" at revision {revision}" if revision else ""
        why = ("HF_HUB_OFFLINE=1 is set" if offline
               else f"the hub could not be reached or refused it ({type(err).__name__})")
        raise HubError(
            f"backbone {repo_id!r}{at} is not in the Hugging Face cache ({where}) and cannot be downloaded: {why}."
            f" Fetch it once on a machine with network access, into the same cache: `hf download {repo_id}`"
            f" (or python -c \"from huggingface_hub import snapshot_download; snapshot_download('{repo_id}')\"),"
            " then run again (offline works from then on); or pass the checkpoint folder itself") from None
    return folder, folder.name
