"""timm's own model test-suite, unmodified, against the registered SkipAt models.

Every model in timm's registry passes timm's ``tests/test_models.py`` (default configs, forward/backward,
TorchScript, torch.fx forward/backward/scripting, classifier reset, ...). The suite ships in timm's source
distribution on PyPI; ``scripts/setup.sh`` unpacks the one of the installed timm version into
``.venv/timm-src/`` (``SKIPSSL_TIMM_SRC`` points elsewhere). The suite imports the module named in
``TORCH_BACKEND`` before collecting models, which registers ours; ``-k skipat`` selects them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
MODELS = ('vit_tiny_patch16_skipat_224', 'vit_small_patch16_skipat_224', 'vit_base_patch16_skipat_224')
# the contract the issue names, for each model: config and shapes, scripting, tracing and its backward
MUST_RUN = (
    'test_model_default_cfgs_non_std',
    'test_model_forward_torchscript',
    'test_model_forward_fx',
    'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
    'test_model_forward',
    'test_model_backward',
)


def timm_source() -> Path:
    return Path(os.environ.get('SKIPSSL_TIMM_SRC', ROOT / '.venv' / 'timm-src' / f'timm-{timm.__version__}'))


@pytest.mark.slow
def test_timm_model_suite_passes_for_the_skipat_models():
    src = timm_source()
    suite = src / 'tests' / 'test_models.py'
    if not suite.is_file():
        reason = f"timm's test-suite is not at {suite} (scripts/setup.sh unpacks it from timm's sdist)"
        if os.environ.get('CI', '').lower() in ('true', '1'):
            pytest.fail(f'CI must run it, but: {reason}', pytrace=False)
        pytest.skip(reason)
    env = dict(os.environ, TORCH_BACKEND='skipssl', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
    env.pop('GITHUB_ACTIONS', None)  # the suite's full settings, not its reduced CI ones
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pytest',
            'tests/test_models.py',
            '-k',
            'skipat',
            '-q',
            '-rA',
            '-p',
            'no:cacheprovider',
            '-W',
            'ignore',
            '--tb=short',
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = set(re.findall(r'^PASSED tests/test_models\.py::(\w+)\[[^\]]*?-(\S+?)\]$', out, re.M))
    for test in MUST_RUN:
        for model in MODELS:
            assert (test, model) in passed, (test, model, sorted(passed))
    assert not re.search(r'\d+ (failed|error)', out), out[-3000:]
