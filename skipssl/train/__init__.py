"""Training: the DeepSpeed student engine, the DINO loop, checkpoints, resume, TensorBoard, device-hours."""

from .run import main, preflight, pretrain

__all__ = ['main', 'pretrain', 'preflight']
