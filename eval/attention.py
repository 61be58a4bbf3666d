"""The attention-map command: DINO's ``visualize_attention.py`` for what the evaluators take (a run, a checkpoint
folder, an exported ``.safetensors``, a timm name), one PNG per image: a row per head, the last block's CLS
attention over the image and the mask of the patches holding ``--keep`` of its mass
(:mod:`skipssl.analysis.attention`).

    skipssl-attention --checkpoint runs/NAME --image photo.jpg [--image ...] --out attn/
    python -m skipssl_eval.attention ...   # the same
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.utils import save_image

from skipssl.analysis.attention import cls_attention_maps, mass_masks, render
from skipssl.data import eval_transform
from skipssl.data.pixels import check_pixels

from .cli import add_preprocessing_arguments, run
from .errors import EvalError
from .source import PIXELS, check_channels, data_settings, load_model, preprocessing_flags


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='skipssl-attention', description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True, help='run folder, checkpoint folder, .safetensors or timm name')
    p.add_argument('--image', action='append', required=True, help='an image file (repeat for several)')
    p.add_argument('--out', default='attention', help='output folder (default ./attention)')
    p.add_argument('--keep', type=float, default=0.6, help="share of each head's attention mass the mask keeps")
    p.add_argument('--which', choices=('teacher', 'student'), default='teacher')
    p.add_argument('--model-kwargs', type=json.loads, default=None, help='JSON kwargs of a random-init timm model')
    p.add_argument('--seed', type=int, default=0, help='random-init seed')
    add_preprocessing_arguments(p)
    return p.parse_args(argv)


def render_files(args: argparse.Namespace) -> None:
    if not 0 < args.keep < 1:
        raise EvalError(f'--keep {args.keep}: a share of the attention mass, in (0, 1)')
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        raise EvalError(f'--image {missing[0]}: no such file')
    if args.checkpoint == PIXELS:
        raise EvalError('--checkpoint pixels has no attention; give a ViT')
    module, info = load_model(args.checkpoint, which=args.which, seed=args.seed, model_kwargs=args.model_kwargs)
    if not getattr(module, 'has_class_token', False):
        raise EvalError(f'{args.checkpoint}: the model has no class token to take attention maps from')
    data = data_settings(info, preprocessing_flags(args))
    check_channels(module, info, data['channels'])
    mode = ImageReadMode.GRAY if data['channels'] == 1 else ImageReadMode.RGB
    tf = eval_transform(data['eval_resize'], data['eval_crop'], data['mean'], data['std'])
    mean = torch.tensor(data['mean']).view(1, -1, 1, 1)
    std = torch.tensor(data['std']).view(1, -1, 1, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module.eval()
    for path in args.image:
        try:
            encoded = Path(path).read_bytes()
            check_pixels(encoded)  # torchvision's decoders have no pixel limit of their own
            image = decode_image(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), mode=mode)
        except (OSError, ValueError, RuntimeError) as exn:
            raise EvalError(f'--image {path}: cannot decode it ({exn})') from exn
        x = tf(image).unsqueeze(0)
        maps = cls_attention_maps(module, x)
        if not bool(torch.isfinite(maps).all()):
            raise EvalError(f'--image {path}: the model gives non-finite attention (NaN/Inf) for it: nothing to draw')
        overlays, masked = render(x * std + mean, maps, mass_masks(maps, args.keep))
        grid = torch.stack([overlays, masked], dim=1).flatten(0, 1)  # per head: heat map, mask
        target = out / f'{Path(path).stem}-attention.png'
        save_image(grid, target, nrow=2, padding=2)
        print(f'{path}: {maps.shape[1]} heads, {int(args.keep * 100)}% mass masks -> {target}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run('skipssl-attention', render_files, {'args': parse_args(argv)})


if __name__ == '__main__':
    sys.exit(main())
