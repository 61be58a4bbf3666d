"""Skip markers for tests that run DeepSpeed at a precision this machine's DeepSpeed refuses (fp16 on a CPU
whose oneDNN has no fp16, such as AMD EPYC; bf16 on a GPU before Ampere): the same check as pretrain.py's
start-up refusal (``skipssl.train.engine.precision_unsupported``), with its reason."""

import pytest

from skipssl.train.engine import precision_unsupported


def needs(precision: str) -> pytest.MarkDecorator:
    reason = precision_unsupported(precision)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def param(*values, precision: str):
    """``pytest.param(*values)`` skipped where ``precision`` is refused."""
    return pytest.param(*values, marks=needs(precision))


def needs_no(precision: str) -> pytest.MarkDecorator:
    """For a test of the refusal: skipped where DeepSpeed accepts ``precision``."""
    return pytest.mark.skipif(
        precision_unsupported(precision) is None, reason=f"this machine's DeepSpeed accepts {precision}"
    )
