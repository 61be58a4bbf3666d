"""Training: the DeepSpeed student engine, the DINO loop, checkpoints, resume, TensorBoard, device-hours."""
from .run import main, pretrain, preflight

__all__ = ['main', 'pretrain', 'preflight']
