"""Sizes per mode: 'gpu' (one H100, the whole suite in 8 minutes) and 'dry' (every stage on the CPU in a
minute or two, for CI). One place, so a stage's code is the same in both modes."""

from dataclasses import dataclass
from typing import Any, Dict, Tuple

# the stages in order, with their share of the budget in seconds for the default 480 s (they sum to it, the
# data preparation's share included); unused time flows on to the next stages
STAGE_SECONDS: Dict[str, float] = {
    'prepare': 40,
    'env': 15,
    'trainer': 125,
    'backbone': 55,
    'step': 50,
    'saving': 45,
    'augment': 25,
    'knn': 40,
    'equal_images': 85,
}
MIN_STAGE_SECONDS = 10.0  # a stage with less left than this is skipped, not started


@dataclass(frozen=True)
class Sizes:
    mode: str
    device: str
    workers: int  # data-loader / shard-writer processes
    # synthetic JPEG shards
    train_images: int
    test_images: int
    image_size: Tuple[int, int]  # (w, h): ImageNet-size on the GPU
    # (b) trainer: config and overrides shared by its runs; iterations = epochs x iterations_per_epoch
    trainer_config: str
    trainer_overrides: Tuple[str, ...]
    trainer_batch: int
    trainer_ipe: int
    trainer_epochs: int
    sigterm_after: int  # SIGTERM once the log shows this iteration
    # (c) backbone throughput (bench.backbone_throughput arguments)
    backbone_args: Tuple[str, ...]
    backbone_batches: Tuple[int, ...]
    # (d) DINO step (bench.train_step_throughput arguments)
    step_args: Tuple[str, ...]
    step_batches: Tuple[int, ...]
    # (h) what SkipAt saves: the grid of bench.skipat_saving (its arguments)
    saving_args: Tuple[str, ...]
    # (e) augmentation and decoding
    aug_batch: int
    aug_canvas: int
    aug_n_local: int
    decode_batch: int
    repeats: int
    # (f) k-NN
    knn_train: int
    knn_test: int
    knn_dim: int
    knn_classes: int
    extract_model: str  # random init: extraction speed does not depend on the weights
    extract_kwargs: Dict
    extract_resize: int
    extract_crop: int
    # (g) equal images
    equal_configs: Dict[str, str]
    equal_overrides: Tuple[str, ...]
    equal_batch: int
    equal_iterations: int
    knn_ks: Tuple[int, ...]

    @property
    def compile(self) -> bool:
        return self.device == 'cuda'  # inductor on the CPU needs minutes and a C++ toolchain: GPU only


_S16 = ('model.drop_path_rate=0.1', 'data.augment_on=device', 'engine.device=cuda')
_TINY = (
    'data.channels=3',
    'model.kwargs.in_chans=3',
    'augment.mean=[0.485,0.456,0.406]',
    'augment.std=[0.229,0.224,0.225]',
    'data.augment_on=device',
    'data.canvas_size=40',
    'data.eval_resize=32',
    'data.eval_crop=28',
    'engine.device=cpu',
    'data.num_workers=0',
    'train.attention_images=1',
)


def _modes(**fields: Tuple[Any, Any]) -> Dict[str, Sizes]:
    """Both modes' Sizes from one table: every field's (gpu, dry) values side by side."""
    return {mode: Sizes(mode=mode, **{k: v[i] for k, v in fields.items()}) for i, mode in enumerate(('gpu', 'dry'))}


MODES = _modes(
    device=('cuda', 'cpu'),
    workers=(12, 2),
    train_images=(4096, 96),
    test_images=(1024, 48),
    image_size=((500, 375), (64, 48)),
    trainer_config=('dino_skipat_vit_s16_100ep.yaml', 'cpu_tiny_skipat.yaml'),
    trainer_overrides=(_S16 + ('data.num_workers=3',), _TINY),
    trainer_batch=(32, 8),
    trainer_ipe=(25, 8),
    trainer_epochs=(2, 3),
    sigterm_after=(15, 4),
    backbone_args=(
        ('--size', 'small', '--repeats', '3', '--iters', '4', '--warmup', '2'),
        ('--size', 'tiny', '--img-size', '64', '--repeats', '1', '--iters', '1', '--warmup', '1'),
    ),
    backbone_batches=((256, 1024), (2,)),
    step_args=(
        ('--size', 'small', '--repeats', '3', '--iters', '3', '--warmup', '2'),
        ('--size', 'tiny', '--global-size', '32', '--local-size', '16', '--n-local', '2', '--head-out-dim', '1024')
        + ('--repeats', '1', '--iters', '1', '--warmup', '1'),
    ),
    step_batches=((64, 128), (2,)),
    # S/16 at 197, 577 and S/8 at 785 tokens, explicit and fused, bf16; the DINO step at 197 tokens only
    saving_args=(
        ('--device', 'cuda', '--sizes', 'small', '--dtypes', 'bf16', '--batch-infer', '256', '--batch-step', '32')
        + ('--step-grid', 'first', '--repeats', '3', '--iters', '3', '--warmup', '2'),
        ('--quick', '--device', 'cpu', '--dtypes', 'fp32', '--attention', 'explicit'),  # fused: in (c) and (d)
    ),
    aug_batch=(128, 4),
    aug_canvas=(256, 48),
    aug_n_local=(10, 2),
    decode_batch=(256, 16),
    repeats=(5, 2),
    knn_train=(200_000, 4000),
    knn_test=(10_000, 300),
    knn_dim=(384, 32),
    knn_classes=(1000, 10),
    extract_model=('vit_small_patch16_skipat_224', 'vit_tiny_patch16_skipat_224'),
    extract_kwargs=({}, {'img_size': 32, 'patch_size': 8, 'depth': 4, 'skip_indices': [1, 2]}),
    extract_resize=(256, 36),
    extract_crop=(224, 32),
    equal_configs=(
        {'vit': 'dino_vit_s16_100ep.yaml', 'skipat': 'dino_skipat_vit_s16_100ep.yaml'},
        {'vit': 'cpu_tiny_vit.yaml', 'skipat': 'cpu_tiny_skipat.yaml'},
    ),
    equal_overrides=(_S16 + ('data.num_workers=12',), _TINY),
    equal_batch=(64, 8),
    equal_iterations=(56, 6),
    knn_ks=((10, 20), (5, 10)),
)
GPU, DRY = MODES['gpu'], MODES['dry']
