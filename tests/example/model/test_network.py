"""``MorphDetector``'s test-time views: the mean of the logits of an image, its mirror image and their rolls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from madlab.io.config import ConfigError
from madlab.model.backbone import load_backbone
from madlab.model.network import MorphDetector


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(folder)
    return folder


def detectors(folder: Path, dropout_p: float = 0.0) -> tuple[MorphDetector, MorphDetector]:
    """The same weights twice: scoring one view, and averaging the two views."""
    one = MorphDetector(*load_backbone(folder), dropout_p)
    with torch.no_grad():  # a head of trained size, so the two views' logits differ visibly
        one.head.weight.copy_(torch.randn(one.head.weight.shape, generator=torch.Generator().manual_seed(1)))
    both = MorphDetector(*load_backbone(folder), dropout_p, flip_average=True)
    both.load_state_dict(one.state_dict())
    return one.eval(), both.eval()


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_eval_scores_are_the_mean_of_each_image_and_its_mirror_scored_alone(vit: Path) -> None:
    one, both = detectors(vit)
    x = images(5)
    # The reference scores every view on its own, one image at a time.
    reference = torch.stack([(one(x[i:i + 1]) + one(x[i:i + 1].flip(-1)))[0] / 2 for i in range(len(x))])
    torch.testing.assert_close(both(x), reference, rtol=0, atol=1e-5)
    assert (both(x) - one(x)).abs().max() > 1e-3, "the mirror image is another view: the scores move"


@torch.no_grad()
def test_a_mirror_symmetric_image_scores_as_one_view(vit: Path) -> None:
    one, both = detectors(vit)
    x = images(3)
    symmetric = (x + x.flip(-1)) / 2
    torch.testing.assert_close(both(symmetric), one(symmetric), rtol=0, atol=1e-5)


def test_training_mode_scores_one_view(vit: Path) -> None:
    one, both = detectors(vit)
    one.train()
    both.train()
    x = images(4)
    torch.testing.assert_close(both(x), one(x), rtol=0, atol=1e-6)
    assert "flip_average=True" in repr(both) and "flip_average=False" in repr(one)


def shifted(folder: Path, shift: int, flip: bool) -> MorphDetector:
    one, _ = detectors(folder)
    model = MorphDetector(*load_backbone(folder), 0.0, flip_average=flip, shift=shift)
    model.load_state_dict(one.state_dict())
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("flip", [False, True])
def test_shifted_views_average_every_roll_of_every_view_scored_alone(vit: Path, flip: bool) -> None:
    one, _ = detectors(vit)
    model = shifted(vit, 2, flip)
    x = images(3)
    # The reference rolls each image on its own, pixel by pixel through index arithmetic.
    rows, cols = torch.arange(16), torch.arange(16)

    def rolled(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return image[..., (rows - dy) % 16, :][..., (cols - dx) % 16]

    reference = []
    for i in range(len(x)):
        bases = [x[i:i + 1], x[i:i + 1].flip(-1)] if flip else [x[i:i + 1]]
        logits = [one(rolled(b, dy, dx)) for b in bases for dy, dx in [(0, 0), (2, 2), (-2, -2), (2, -2), (-2, 2)]]
        reference.append(torch.cat(logits).mean())
    torch.testing.assert_close(model(x), torch.stack(reference), rtol=0, atol=1e-5)
    assert len(model.views(x)) == (10 if flip else 5)
    assert (model(x) - (shifted(vit, 0, flip)(x))).abs().max() > 1e-4, "rolled views move the scores"
    assert "shift=2" in repr(model)


def test_training_mode_scores_one_view_whatever_the_shift(vit: Path) -> None:
    one, _ = detectors(vit)
    model = shifted(vit, 3, True).train()
    one.train()
    x = images(2)
    torch.testing.assert_close(model(x), one(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [-1, 8, 20])
def test_a_shift_outside_half_the_input_is_refused_naming_the_range(vit: Path, shift: int) -> None:
    with pytest.raises(ConfigError, match=rf"test_time_shift={shift} must be in \[0, 8\) pixels for 16 px"):
        MorphDetector(*load_backbone(vit), 0.0, shift=shift)
