"""DINO-style attention maps: the 60% mass masks against DINO's visualize_attention.py procedure, the maps against
the model's attention, the rendering, and the command on real image files."""

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torchvision.io import write_png

import skipssl  # noqa: F401  (registers the models)
from skipssl.analysis.attention import cls_attention_maps, mass_masks, render
from skipssl.models import get_last_selfattention

ROOT = Path(__file__).resolve().parents[1]


def dino_threshold(attentions: np.ndarray, threshold: float) -> np.ndarray:
    """DINO's visualize_attention.py, per head (nh, w*h), as there: sort, normalise, cumulate, reorder."""
    attentions = torch.from_numpy(attentions)
    nh = attentions.shape[0]
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(nh):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn.numpy()


@pytest.mark.parametrize('keep', [0.6, 0.9])
def test_mass_masks_are_dinos(keep):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 7, 5, generator=g) ** 4  # a few strong patches per head, as trained heads have
    masks = mass_masks(maps, keep)
    for b in range(3):
        expected = dino_threshold(maps[b].flatten(1).numpy().copy(), keep)
        np.testing.assert_array_equal(masks[b].flatten(1).numpy(), expected)
    share = (maps * masks).flatten(2).sum(-1) / maps.flatten(2).sum(-1)
    assert (share >= keep - 1e-6).all()
    # minimal: without its weakest kept patch, no mask holds the share any more
    weakest = torch.where(masks, maps, torch.full_like(maps, float('inf'))).flatten(2).amin(-1)
    assert ((share - weakest / maps.flatten(2).sum(-1)) < keep).all()


def test_maps_are_the_class_tokens_attention_and_render_to_the_image():
    torch.manual_seed(0)
    model = timm.create_model(
        'vit_tiny_patch16_skipat_224', depth=4, skip_indices=(2,), num_classes=0, reg_tokens=1
    ).eval()
    x = torch.randn(2, 3, 64, 48)
    maps = cls_attention_maps(model, x)
    attn = get_last_selfattention(model, x)
    assert maps.shape == (2, 3, 4, 3)
    torch.testing.assert_close(maps.flatten(2), attn[:, :, 0, 2:])  # class token + 1 register left out
    assert (maps.flatten(2).sum(-1) <= 1 + 1e-5).all()
    overlays, masked = render(x.sigmoid(), maps, mass_masks(maps))
    assert overlays.shape == masked.shape == (6, 3, 64, 48)
    assert 0 <= overlays.min() and overlays.max() <= 1
    # outside its mask a head's image is dimmed to 20%, inside it is the image
    inside = torch.nn.functional.interpolate(mass_masks(maps).reshape(6, 1, 4, 3).float(), size=(64, 48))
    rgb = x.sigmoid().repeat_interleave(3, dim=0)
    torch.testing.assert_close(masked, rgb * (0.2 + 0.8 * inside))


def skipssl_attention(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'skipssl_eval.attention', '--checkpoint', 'vit_tiny_patch16_skipat_224', *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_command_renders_a_png_per_image(tmp_path):
    images = []
    for i, shape in enumerate([(3, 80, 64), (3, 50, 90)]):
        path = tmp_path / f'img{i}.png'
        write_png(torch.randint(0, 256, shape, dtype=torch.uint8), str(path))
        images += ['--image', str(path)]
    out = tmp_path / 'attn'
    model = ['--model-kwargs', '{"depth": 4, "skip_indices": [2]}']
    proc = skipssl_attention(*model, '--resize', '64', '--crop', '64', *images, '--out', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from torchvision.io import read_image

    for i in range(2):
        png = read_image(str(out / f'img{i}-attention.png'))
        assert png.shape == (3, 3 * 64 + 4 * 2, 2 * 64 + 3 * 2)  # 3 heads x (heat map, mask), 2 px padding
    bad = skipssl_attention('--image', str(tmp_path / 'nope.jpg'))
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr and 'nope.jpg: no such file' in bad.stderr


def test_command_refuses_an_image_declaring_too_many_pixels(tmp_path):
    # a PNG whose header declares 30000 x 30000 pixels: refused from its header, never decoded
    ihdr = struct.pack('>IIBBBBB', 30000, 30000, 8, 0, 0, 0, 0)
    chunk = b'IHDR' + ihdr
    png = b'\x89PNG\r\n\x1a\n' + struct.pack('>I', len(ihdr)) + chunk + struct.pack('>I', zlib.crc32(chunk))
    bomb = tmp_path / 'bomb.png'
    bomb.write_bytes(png + b'\x00' * 64)
    model = ['--model-kwargs', '{"depth": 2, "skip_indices": [1]}']
    proc = skipssl_attention(*model, '--image', str(bomb), '--out', str(tmp_path / 'attn'))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert 'bomb.png' in proc.stderr and '30000 x 30000 pixels' in proc.stderr
