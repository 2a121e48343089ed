"""Augmentation presets: the batched random shift equals torchvision's padded random crop."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from kdlib.data import TRAIN_PRESETS, RandomShift, build_transforms


def all_padded_crops(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    padded = TF.pad(image, [pad])
    h, w = image.shape[-2:]
    return [TF.crop(padded, top, left, h, w) for top in range(2 * pad + 1) for left in range(2 * pad + 1)]


def test_random_shift_is_per_image_a_padded_random_crop():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 12, 10), dtype=torch.uint8)
    shifted = RandomShift(2)(images)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    offsets = set()
    for image, out in zip(images, shifted):
        matches = [i for i, crop in enumerate(all_padded_crops(image, 2)) if torch.equal(crop, out)]
        assert matches, "output is not any padded crop of its input"
        offsets.add(matches[0])
    assert len(offsets) > 5  # each image draws its own offset


def test_random_shift_covers_every_offset_and_is_seeded():
    image = torch.arange(1, 26, dtype=torch.uint8).view(1, 1, 5, 5).repeat(400, 1, 1, 1)
    torch.manual_seed(1)
    first = RandomShift(1)(image)
    torch.manual_seed(1)
    assert torch.equal(first, RandomShift(1)(image))
    crops = all_padded_crops(image[0], 1)
    seen = {next(i for i, c in enumerate(crops) if torch.equal(c, out)) for out in first}
    assert seen == set(range(9))


def test_shift_preset_shifts_per_batch_and_eval_has_no_augmentation():
    train = build_transforms("shift", 28, 28, True, {"shift_px": 2})
    assert isinstance(train.batch, RandomShift) and train.batch.max_px == 2
    evaluation = build_transforms("shift", 28, 28, False, {"shift_px": 2})
    assert evaluation.batch is None
    assert evaluation.sample is None  # nothing to do per image


def test_resize_when_model_input_differs_from_stored_size():
    augmentation = build_transforms("none", 32, 28, False)
    assert augmentation.sample(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape == (1, 32, 32)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="shift"):
        build_transforms("autoaugment-typo", 28, 28, True)
    assert {"none", "shift"} <= set(TRAIN_PRESETS.names())


def test_hflip_option_flips_in_the_sample_transform():
    augmentation = build_transforms("shift", 8, 8, True, {"shift_px": 1, "hflip": True})
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in augmentation.sample.transforms)


@pytest.mark.parametrize("preset", ["imagenet", "deit", "cub_ls", "lshfm"])
def test_natural_image_presets_output_the_model_size_in_uint8(preset):
    torch.manual_seed(0)
    augmentation = build_transforms(preset, 32, None, True)
    for shape in ((3, 50, 70), (3, 90, 41)):
        out = augmentation.sample(torch.randint(0, 256, shape, dtype=torch.uint8))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert augmentation.batch is None


def test_eval_resizes_shorter_side_by_crop_pct_then_center_crops():
    augmentation = build_transforms("cub_ls", 32, None, False, eval_crop_pct=0.5)
    resize, crop = augmentation.sample.transforms
    assert resize.size == [64] and list(crop.size) == [32, 32]
    assert augmentation.sample(torch.zeros(3, 100, 80, dtype=torch.uint8)).shape == (3, 32, 32)


def test_presets_that_do_not_size_images_get_the_eval_resize_first():
    augmentation = build_transforms("shift", 32, None, True)
    out = augmentation.sample(torch.zeros(1, 70, 50, dtype=torch.uint8))
    assert out.shape == (1, 32, 32) and isinstance(augmentation.batch, RandomShift)


def test_mix_gives_soft_targets_and_respects_off():
    from kdlib.data.transforms import build_mix

    assert build_mix(5) is None
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    for mix in (build_mix(5, mixup_alpha=0.8), build_mix(5, cutmix_alpha=1.0), build_mix(5, 0.8, 1.0)):
        mixed, targets = mix(images, labels)
        assert mixed.shape == images.shape and targets.shape == (8, 5)
        assert torch.allclose(targets.sum(dim=1), torch.ones(8))
        assert (targets.max(dim=1).values < 1).any()  # really mixed


def test_fit_trains_with_mixup_soft_targets_through_kd_hard_term():
    from kdlib.data.transforms import build_mix
    from kdlib.losses import kd_loss

    logits, teacher = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    _, soft = build_mix(5, mixup_alpha=0.8)(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    loss = kd_loss(logits, teacher, soft, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
