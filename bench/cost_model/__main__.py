"""Predict SkipAt's saving on GPUs from a roofline of every recorded op; check it against the paper's table.

    python -m bench.cost_model                 # writes bench/results/cost_model_predictions.json
    python -m bench.cost_model --out x.json

Machine-independent: every op is recorded on fake tensors (shapes only), so the figures depend on torch's and
timm's versions (which ops a model dispatches) and on the device table, not on the machine that runs this.
"""

import argparse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch

from skipssl_common.io import atomic_write_json

from .roofline import DEVICES, Device, calibrate, predicted_img_per_s, roofline, time_by_op
from .workloads import GLOBAL_CROPS, GLOBAL_PX, LOCAL_CROPS, LOCAL_PX, PRECISIONS, record_backbone, record_dino_step

RESULTS = Path(__file__).resolve().parent.parent / 'results' / 'cost_model_predictions.json'
SIZES = ('tiny', 'small')
# The paper's Table (one A100, batch 1024, timm 0.5.4), img/s; the calibration uses ViT-T's row only.
PAPER = {('vit', 'tiny'): 5800.0, ('skipat', 'tiny'): 6900.0, ('vit', 'small'): 3200.0, ('skipat', 'small'): 3800.0}
CALIBRATION_ROW = ('vit', 'tiny')
PAPER_DEVICE, PAPER_BATCH = 'A100-SXM', 1024
# timm's benchmark script measures with native AMP (--amp), fp16 on an A100; the paper's code is timm 0.5.4's
PAPER_PRECISION, PAPER_ATTENTION = 'fp16', 'explicit_timm054'
# alternatives, each calibrated on ViT-T's row the same way, to show how much the choice matters
PAPER_ALTERNATIVES = (('fp32', 'explicit_timm054'), ('fp16', 'explicit'))
# the paper's DINO figure, ViT-S/16, 100 epochs (GPU type not stated)
PAPER_DINO_GPU_HOURS = {'vit': 131.0, 'skipat': 120.0}
IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 100
DINO_BATCH_PER_GPU = 64
INFER_BATCH = 1024
# the token sweep: (image px, patch px) -> tokens incl. CLS: 197, 577, 785
SWEEP = ((224, 16), (384, 16), (224, 8))
SWEEP_BATCH = 256


def model_name(family: str, size: str) -> str:
    return f'vit_{size}_patch16_224' if family == 'vit' else f'vit_{size}_patch16_skipat_224'


@dataclass(frozen=True)
class PaperCheck:
    precision: str
    attention: str
    efficiency: float
    rows: List[Dict]
    ratios: List[Dict]

    @property
    def max_throughput_error(self) -> float:
        return max(abs(r['relative_error']) for r in self.rows if r['predicted'])

    @property
    def max_ratio_error(self) -> float:
        return max(abs(r['relative_error']) for r in self.ratios)

    def to_dict(self) -> Dict:
        return {
            'precision': self.precision,
            'attention': self.attention,
            'efficiency': self.efficiency,
            'calibrated_on': f'{CALIBRATION_ROW[0]}-{CALIBRATION_ROW[1]}',
            'rows': self.rows,
            'ratios': self.ratios,
            'max_abs_relative_error_throughput': self.max_throughput_error,
            'max_abs_relative_error_ratio': self.max_ratio_error,
        }


def paper_check(precision: str, attention: str) -> PaperCheck:
    """Calibrate the efficiency on ViT-T's row, predict the other three rows and the two SkipAt/ViT ratios."""
    device = DEVICES[PAPER_DEVICE]
    seconds = {
        key: roofline(record_backbone(model_name(*key), attention, PAPER_BATCH, precision), device).seconds
        for key in PAPER
    }
    eff = calibrate(seconds[CALIBRATION_ROW], PAPER_BATCH, PAPER[CALIBRATION_ROW])
    rows = []
    for key, paper in PAPER.items():
        pred = predicted_img_per_s(seconds[key], PAPER_BATCH, eff)
        rows.append(
            {
                'model': f'{key[0]}-{key[1]}',
                'roofline_img_per_s': PAPER_BATCH / seconds[key],
                'predicted_img_per_s': pred,
                'paper_img_per_s': paper,
                'relative_error': pred / paper - 1,
                'predicted': key != CALIBRATION_ROW,
            }
        )
    ratios = []
    for size in SIZES:
        pred = seconds[('vit', size)] / seconds[('skipat', size)]  # the efficiency cancels
        paper = PAPER[('skipat', size)] / PAPER[('vit', size)]
        ratios.append(
            {'size': size, 'predicted_skipat_over_vit': pred, 'paper': paper, 'relative_error': pred / paper - 1}
        )
    return PaperCheck(precision, attention, eff, rows, ratios)


def _pair(record, device: Device) -> Tuple[Dict, Dict]:
    """(ViT, SkipAt) rooflines of ``record(family)``, with the slowest ops of each."""
    out = []
    for family in ('vit', 'skipat'):
        ops = record(family)
        out.append(dict(roofline(ops, device).to_dict(), top_ops=time_by_op(ops, device, top=6)))
    return out[0], out[1]


def predicted_dino(device: Device, kind: str, precision: str, efficiency: float, errors: Dict) -> Dict:
    """SkipAt-S vs ViT-S DINO steps of 64 images per GPU: step times, ratio, and the GPU-hours of 100 ImageNet
    epochs (100 x 1,281,167 / 64 steps), with the model's ``errors`` on the paper's table beside them."""

    def record(family: str) -> List:
        return record_dino_step(model_name(family, 'small'), kind, DINO_BATCH_PER_GPU, precision)

    vit, skip = _pair(record, device)
    steps = EPOCHS * IMAGENET_TRAIN_IMAGES / DINO_BATCH_PER_GPU
    peak = device.peak(str(PRECISIONS[precision]).removeprefix('torch.'))
    return {
        'device': device.name,
        'attention': kind,
        'precision': precision,
        'batch_per_gpu': DINO_BATCH_PER_GPU,
        'crops': f'{GLOBAL_CROPS}x{GLOBAL_PX} + {LOCAL_CROPS}x{LOCAL_PX}',
        'vit_predicted_step_s': vit['seconds'] / efficiency,
        'skipat_predicted_step_s': skip['seconds'] / efficiency,
        'predicted_ratio_skipat_over_vit': vit['seconds'] / skip['seconds'],
        'vit_predicted_gpu_hours_100_epochs': steps * vit['seconds'] / efficiency / 3600,
        'skipat_predicted_gpu_hours_100_epochs': steps * skip['seconds'] / efficiency / 3600,
        'vit_mfu_at_prediction': vit['flops'] * efficiency / vit['seconds'] / peak,
        'error_on_paper_table': errors,
        'roofline': {'vit': vit, 'skipat': skip},
    }


def h100_predictions(check: PaperCheck) -> Dict:
    """SkipAt-S vs ViT-S on an H100 in bf16: inference and the DINO step, explicit and fused attention; the
    GPU-hours of 100 ImageNet epochs of DINO from the step time with the paper-calibrated efficiency."""
    device = DEVICES['H100-SXM']
    eff = check.efficiency
    errors = {'ratio': check.max_ratio_error, 'absolute': check.max_throughput_error}
    out: Dict = {}
    for kind in ('fused', 'explicit'):

        def record(family: str, k: str = kind) -> List:
            return record_backbone(model_name(family, 'small'), k, INFER_BATCH, 'bf16')

        vit, skip = _pair(record, device)
        infer = {
            'batch': INFER_BATCH,
            'vit_predicted_img_per_s': predicted_img_per_s(vit['seconds'], INFER_BATCH, eff),
            'skipat_predicted_img_per_s': predicted_img_per_s(skip['seconds'], INFER_BATCH, eff),
            'predicted_ratio_skipat_over_vit': vit['seconds'] / skip['seconds'],
            'error_on_paper_table': errors,
            'roofline': {'vit': vit, 'skipat': skip},
        }
        out[kind] = {'inference': infer, 'dino_step': predicted_dino(device, kind, 'bf16', eff, errors)}
    return out


def paper_dino_check(check: PaperCheck) -> Dict:
    """A second check, on the paper's DINO figure (100 epochs of ViT-S: about 131 GPU-hours; with SkipAt about
    120): the predicted SkipAt/ViT DINO-step ratio on an A100 in fp16 with timm 0.5.4's attention (DINO's own
    ViT writes its attention the same way), against 131 / 120. The paper does not name its GPUs, so only the
    ratio is compared."""
    errors = {'ratio': check.max_ratio_error, 'absolute': check.max_throughput_error}
    pred = predicted_dino(DEVICES[PAPER_DEVICE], PAPER_ATTENTION, PAPER_PRECISION, check.efficiency, errors)
    paper = PAPER_DINO_GPU_HOURS['vit'] / PAPER_DINO_GPU_HOURS['skipat']
    ratio = pred['predicted_ratio_skipat_over_vit']
    return {
        'paper_gpu_hours_100_epochs': PAPER_DINO_GPU_HOURS,
        'paper_ratio_skipat_over_vit': paper,
        'predicted_ratio_skipat_over_vit': ratio,
        'relative_error': ratio / paper - 1,
        'prediction': pred,
    }


def token_sweep() -> List[Dict]:
    """SkipAt-S/ViT-S roofline ratios on an H100 (bf16) at 197, 577 and 785 tokens, both attention kinds,
    inference and forward+backward (the efficiency cancels in a ratio)."""
    device = DEVICES['H100-SXM']
    rows = []
    for img, patch in SWEEP:
        tokens = (img // patch) ** 2 + 1
        for kind in ('explicit', 'fused'):
            for mode in ('infer', 'train'):
                t = {
                    f: roofline(
                        record_backbone(model_name(f, 'small'), kind, SWEEP_BATCH, 'bf16', mode, img, patch), device
                    )
                    for f in ('vit', 'skipat')
                }
                rows.append(
                    {
                        'img_size': img,
                        'patch_size': patch,
                        'tokens': tokens,
                        'attention': kind,
                        'mode': mode,
                        'batch': SWEEP_BATCH,
                        'predicted_ratio_skipat_over_vit': t['vit'].seconds / t['skipat'].seconds,
                        'flop_ratio_vit_over_skipat': t['vit'].flops / t['skipat'].flops,
                    }
                )
                ratio = rows[-1]['predicted_ratio_skipat_over_vit']
                print(f'  {tokens:4d} tokens {kind:8s} {mode:5s}  predicted SkipAt/ViT {ratio:.3f}', flush=True)
    return rows


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=RESULTS)
    args = p.parse_args(argv)

    check = paper_check(PAPER_PRECISION, PAPER_ATTENTION)
    print(f'paper check ({PAPER_PRECISION}, {PAPER_ATTENTION}): efficiency {check.efficiency:.3f} from ViT-T')
    for r in check.rows:
        tag = 'predicted' if r['predicted'] else 'calibrated'
        print(
            f'  {r["model"]:12s} {r["predicted_img_per_s"]:7.0f} img/s ({tag}), paper {r["paper_img_per_s"]:.0f}, '
            f'error {r["relative_error"]:+.1%}'
        )
    for r in check.ratios:
        print(
            f'  {r["size"]:5s} SkipAt/ViT predicted {r["predicted_skipat_over_vit"]:.3f}, paper {r["paper"]:.3f}, '
            f'error {r["relative_error"]:+.1%}'
        )
    alternatives = [paper_check(prec, kind) for prec, kind in PAPER_ALTERNATIVES]
    for alt in alternatives:
        print(
            f'  alternative {alt.precision} {alt.attention}: efficiency {alt.efficiency:.3f}, max error '
            f'throughput {alt.max_throughput_error:.1%}, ratio {alt.max_ratio_error:.1%}'
        )
    h100 = h100_predictions(check)
    for kind, block in h100.items():
        i, d = block['inference'], block['dino_step']
        print(
            f'H100 bf16 {kind}: inference SkipAt/ViT {i["predicted_ratio_skipat_over_vit"]:.3f}; DINO step '
            f'{d["predicted_ratio_skipat_over_vit"]:.3f}; 100 epochs '
            f'ViT-S {d["vit_predicted_gpu_hours_100_epochs"]:.0f} '
            f'SkipAt-S {d["skipat_predicted_gpu_hours_100_epochs"]:.0f} GPU-hours (predicted)'
        )
    dino_check = paper_dino_check(check)
    print(
        f'paper DINO figure: SkipAt/ViT 100-epoch GPU-hours ratio predicted '
        f'{dino_check["predicted_ratio_skipat_over_vit"]:.3f}, paper {dino_check["paper_ratio_skipat_over_vit"]:.3f}, '
        f'error {dino_check["relative_error"]:+.1%}'
    )
    sweep = token_sweep()
    report = {
        'benchmark': 'cost_model',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'machine_independent': True,
        'note': (
            'every figure is predicted by a roofline over the aten ops recorded on fake tensors (no device ran '
            'them): it depends on the torch and timm versions and on the device table, not on this machine'
        ),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'devices': {k: vars(v) for k, v in DEVICES.items()},
        'calibration': {
            'constant': 'efficiency = measured img/s x roofline seconds / images (one factor for all ops)',
            'row': 'ViT-T, A100, batch 1024, the paper: 5.8k img/s',
            'efficiency': check.efficiency,
        },
        'paper_check': check.to_dict(),
        'paper_check_alternatives': [a.to_dict() for a in alternatives],
        'error_on_paper_table': {
            'throughput': check.max_throughput_error,
            'ratio': check.max_ratio_error,
        },
        'paper_dino_check': dino_check,
        'h100_bf16': h100,
        'h100_bf16_token_sweep': sweep,
        'counted': (
            'DINO step: teacher forward (2 global crops), student forward and backward (all crops), head, DINO '
            'loss and centre, gradients into fp32, per-parameter clipping, fused AdamW on fp32 master weights, '
            'weights back to bf16, teacher EMA'
        ),
        'not_counted': (
            'data loading and augmentation, gradient all-reduce across GPUs, kernel launch overhead and host '
            'gaps, kernel fusion (torch.compile), caches (L2), evaluation, checkpoints'
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, args.out, indent=2)
    print(f'wrote {args.out}')
    return report


if __name__ == '__main__':
    main()
