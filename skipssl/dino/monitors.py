"""Reading DINO's collapse monitors (computed by DINOLoss every step)."""

import math
from typing import Mapping, Optional


def collapse_state(metrics: Mapping[str, float], out_dim: int, rel_tol: float = 0.02) -> Optional[str]:
    """'uniform' when the teacher's per-sample entropy is within ``rel_tol`` of ln(out_dim) (every output
    equally likely: the loss sits at ln K), 'one-hot' when it is within ``rel_tol * ln K`` of 0 and the
    batch uses essentially one prototype, else None. ``metrics`` holds floats from DINOLoss.metrics."""
    ln_k = math.log(out_dim)
    h = float(metrics['teacher_entropy'])
    if h >= (1 - rel_tol) * ln_k:
        return 'uniform'
    marginal = float(metrics.get('teacher_marginal_entropy', h))
    if h <= rel_tol * ln_k and marginal <= rel_tol * ln_k:
        return 'one-hot'
    return None
