"""Multi-crop augmentation: both paths follow DINO's recipe, and agree with each other and torchvision."""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from skipssl.data import BatchedMultiCrop, MultiCropConfig, MultiCropTransform, stack_crops
from skipssl.data import multicrop as M


def smooth_images(n, size=64, channels=3, seed=0):
    """Structured colour images (upsampled low-res noise), uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 6, 6, generator=g)
    return (torch.nn.functional.interpolate(low, size=(size, size), mode='bilinear') * 255).to(torch.uint8)


SMALL = dict(global_size=32, local_size=16, n_local=3)


def value_bounds(cfg):
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    return ((0 - mean) / std).view(-1, 1, 1), ((1 - mean) / std).view(-1, 1, 1)


def test_default_config_is_dinos_recipe():
    c = MultiCropConfig()
    assert (c.global_size, c.local_size, c.n_global, c.n_local) == (224, 96, 2, 10)
    assert c.global_scale == (0.4, 1.0) and c.local_scale == (0.05, 0.4)
    assert (c.brightness, c.contrast, c.saturation, c.hue, c.jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    assert (c.grayscale_p, c.blur_p_global1, c.blur_p_global2, c.blur_p_local) == (0.2, 1.0, 0.1, 0.5)
    assert c.solarize_p == 0.2 and c.blur_sigma == (0.1, 2.0) and c.flip_p == 0.5
    specs = c.crop_specs()
    assert [s['solarize_p'] for s in specs] == [0.0, 0.2] + [0.0] * 10


@pytest.mark.parametrize('path', ['cpu', 'batched'])
def test_output_shapes_dtype_and_range(path):
    cfg = MultiCropConfig(**SMALL)
    imgs = smooth_images(4)
    crops = (BatchedMultiCrop(cfg)(imgs) if path == 'batched'
             else stack_crops([MultiCropTransform(cfg)(im) for im in imgs]))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    lo, hi = value_bounds(cfg)
    for c in crops:
        assert c.dtype == torch.float32
        assert (c >= lo - 1e-4).all() and (c <= hi + 1e-4).all()


def test_paths_agree_in_distribution():
    """Per-crop, per-channel mean and std over 2048 images: the batched path matches torchvision's.

    Over seeds the two paths differ by at most 0.032 (means) and 0.019 (stds); switching off jitter,
    grayscale, blur, or hue+saturation in one path moves a statistic by 0.034 to 0.15.
    """
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=2)
    imgs = smooth_images(2048, size=32)
    torch.manual_seed(1)
    cpu = stack_crops([MultiCropTransform(cfg)(im) for im in imgs])
    batched = BatchedMultiCrop(cfg)(imgs, generator=torch.Generator().manual_seed(2))
    for k, (a, b) in enumerate(zip(cpu, batched)):
        torch.testing.assert_close(b.mean(dim=(0, 2, 3)), a.mean(dim=(0, 2, 3)), atol=0.045, rtol=0, msg=f'crop {k}')
        torch.testing.assert_close(b.std(dim=(0, 2, 3)), a.std(dim=(0, 2, 3)), atol=0.03, rtol=0, msg=f'crop {k}')


@pytest.mark.parametrize('op, ref, factors', [
    (M._adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
    (M._adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
    (M._adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
    (M._adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.07]),
])
def test_per_sample_colour_ops_match_torchvision(op, ref, factors):
    x = torch.rand(3, 3, 12, 10)
    got = op(x, torch.tensor(factors))
    expected = torch.stack([ref(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


def test_batched_blur_matches_torchvision_gaussian_blur():
    cfg = MultiCropConfig(blur_sigma=(1.3, 1.3))
    x = torch.rand(2, 3, 20, 20)
    got = BatchedMultiCrop(cfg)._blur(x, 1.0, None)
    torch.testing.assert_close(got, TF.gaussian_blur(x, [cfg.kernel_size] * 2, [1.3, 1.3]), atol=1e-4, rtol=0)
    assert torch.equal(BatchedMultiCrop(cfg)._blur(x, 0.0, None), x)


def test_batched_crop_boxes_follow_random_resized_crop():
    cfg = MultiCropConfig()
    n = 4000
    sizes = torch.tensor([[300.0, 500.0]]).expand(n, 2)
    theta = BatchedMultiCrop(cfg)._crop_boxes(sizes, (0.05, 0.4), torch.Generator().manual_seed(0))
    w, h = theta[:, 0, 0] * 500, theta[:, 1, 1] * 300
    area = w * h / (300 * 500)
    assert area.min() >= 0.05 - 0.01 and area.max() <= 0.4 + 0.01
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    # log-aspect ratio is uniform: about half the crops are wider than tall
    assert abs((ratio > 1).float().mean().item() - 0.5) < 0.05
    # boxes stay inside the image: centre +- half extent within [-1, 1]
    for axis in (0, 1):
        c, s = theta[:, axis, 2], theta[:, axis, axis]
        assert (c - s >= -1 - 1e-5).all() and (c + s <= 1 + 1e-5).all()


def test_batched_full_crop_without_flip_is_the_image():
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
                          solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    imgs = smooth_images(2, size=16)
    out = BatchedMultiCrop(cfg)(imgs)
    torch.testing.assert_close(out[0], imgs.float() / 255, atol=1e-5, rtol=0)
    flipped = BatchedMultiCrop(MultiCropConfig(**{**cfg.__dict__, 'flip_p': 1.0}))(imgs)
    torch.testing.assert_close(flipped[1], imgs.float().flip(-1) / 255, atol=1e-5, rtol=0)


def test_solarisation_only_on_second_global_crop():
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=2, jitter_p=0.0, grayscale_p=0.0,
                          blur_p_global1=0.0, blur_p_global2=0.0, blur_p_local=0.0, solarize_p=1.0,
                          global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    imgs = torch.full((2, 3, 16, 16), 230, dtype=torch.uint8)  # bright: solarised to dark
    out = BatchedMultiCrop(cfg)(imgs)
    assert out[0].mean() > 0.85 and out[1].mean() < 0.15 and all(o.mean() > 0.85 for o in out[2:])
    cpu = MultiCropTransform(cfg)(imgs[0])
    assert cpu[0].mean() > 0.85 and cpu[1].mean() < 0.15 and all(o.mean() > 0.85 for o in cpu[2:])


def test_batched_path_is_reproducible_with_a_generator_and_takes_original_sizes():
    cfg = MultiCropConfig(**SMALL)
    imgs = smooth_images(3)
    a = BatchedMultiCrop(cfg)(imgs, generator=torch.Generator().manual_seed(5))
    b = BatchedMultiCrop(cfg)(imgs, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    out = BatchedMultiCrop(cfg)(imgs, orig_sizes=torch.tensor([[480, 640], [64, 64], [500, 200]]))
    assert all(torch.isfinite(o).all() for o in out)


def test_single_channel_images():
    cfg = MultiCropConfig(global_size=28, local_size=14, n_local=2, mean=(0.286,), std=(0.353,))
    imgs = smooth_images(4, size=28, channels=1)
    batched = BatchedMultiCrop(cfg)(imgs)
    cpu = stack_crops([MultiCropTransform(cfg)(im) for im in imgs])
    assert [c.shape for c in batched] == [c.shape for c in cpu] == [torch.Size([4, 1, 28, 28])] * 2 + \
        [torch.Size([4, 1, 14, 14])] * 2


def test_bad_config_and_input_fail_clearly():
    with pytest.raises(ValueError, match='global crops'):
        MultiCropConfig(n_global=3)
    with pytest.raises(ValueError, match='local_scale'):
        MultiCropConfig(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match='probability'):
        MultiCropConfig(solarize_p=1.5)
    with pytest.raises(ValueError, match='uint8'):
        BatchedMultiCrop()(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match='channels'):
        BatchedMultiCrop()(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    assert MultiCropConfig().kernel_size == 2 * math.ceil(6.0) + 1
