"""The DINO method (Caron et al. 2021), independent of the training engine."""

from .head import DINOHead, WeightNormLinear
from .loss import DINOLoss
from .monitors import collapse_state
from .multicrop import MultiCropWrapper
from .optim import apply_schedules, clip_gradients_per_param, param_groups, reset_frozen_state, reset_state
from .schedules import cosine_schedule, epoch_warmup_schedule, linear_warmup_schedule, scaled_lr
from .teacher import ema_update, make_teacher, matching_parameters

__all__ = [
    'DINOHead',
    'DINOLoss',
    'MultiCropWrapper',
    'WeightNormLinear',
    'apply_schedules',
    'clip_gradients_per_param',
    'collapse_state',
    'cosine_schedule',
    'ema_update',
    'epoch_warmup_schedule',
    'linear_warmup_schedule',
    'make_teacher',
    'matching_parameters',
    'param_groups',
    'reset_frozen_state',
    'reset_state',
    'scaled_lr',
]
