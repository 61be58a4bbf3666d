"""The knobs that trade accuracy for cost: the attention kernel of both models of a comparison
(``model.attention``: fused or explicit) and Phi's hidden expansion (``model.kwargs.phi_hidden_ratio``)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from timm.layers import Attention
from torch.utils._python_dispatch import TorchDispatchMode

from skipssl import checkpoint as ckpt
from skipssl.config import ConfigError, load_config
from skipssl.dino import make_teacher
from skipssl.models import set_attention
from skipssl.train.plan import build_student

from .image_shards import write_pattern_shards
from .test_train import TINY, _env, log_lines

ROOT = Path(__file__).resolve().parents[1]
SMALL_VIT = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4)  # 65 tokens


class OpLog(TorchDispatchMode):
    """The aten ops a forward pass dispatches, with their output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func.overloadpacket), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def _pair(name, **kwargs):
    torch.manual_seed(0)
    model = ckpt.build_backbone(name, dict(SMALL_VIT, **kwargs)).eval()
    return model


@pytest.mark.parametrize(
    'name,kwargs', [('vit_tiny_patch16_224', {}), ('vit_tiny_patch16_skipat_224', {'skip_indices': [1, 2]})]
)
def test_explicit_and_fused_attention_give_the_same_outputs_and_only_explicit_writes_the_matrix(name, kwargs):
    model = _pair(name, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    outs, logs = {}, {}
    for kind in ('fused', 'explicit'):
        assert set_attention(model, kind) == 4 - len(kwargs.get('skip_indices', []))  # every computed block
        with torch.no_grad(), OpLog() as log:
            outs[kind] = model(x)
        logs[kind] = log.ops
    torch.testing.assert_close(outs['explicit'], outs['fused'], rtol=1e-4, atol=1e-5)
    n_attn = 4 - len(kwargs.get('skip_indices', []))
    matrix = (2, 4, 65, 65)  # (batch, heads, tokens, tokens)

    def sdpa(ops):
        return [op for op, _ in ops if 'scaled_dot_product' in op]

    def softmaxes(ops):
        return [shape for op, shape in ops if op.endswith('softmax') and shape == matrix]

    assert not sdpa(logs['explicit']) and len(softmaxes(logs['explicit'])) == n_attn
    assert len(sdpa(logs['fused'])) == n_attn and not softmaxes(logs['fused'])


def test_attention_kind_is_config_applies_to_student_and_teacher_and_bad_values_are_one_line_errors():
    assert load_config(TINY).model.attention == 'fused'
    for kind in ('fused', 'explicit'):
        student = build_student(load_config(TINY, [f'model.attention={kind}']))
        for model in (student, make_teacher(student)):
            flags = {m.fused_attn for m in model.modules() if isinstance(m, Attention)}
            assert flags == {kind == 'fused'}
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ['model.attention=flash'])
    assert str(err.value) == "model.attention: fused or explicit, got 'flash'"
    with pytest.raises(ValueError, match='fused or explicit'):
        set_attention(student, 'sdpa')


@pytest.mark.parametrize(
    'override,key',
    [
        ('model.kwargs.phi_hidden_ratio=0', 'model.kwargs.phi_hidden_ratio'),
        ('model.kwargs.phi_hidden_ratio=-2', 'model.kwargs.phi_hidden_ratio'),
        ('model.kwargs.phi_hidden_ratio=two', 'model.kwargs.phi_hidden_ratio'),
        ('model.kwargs.phi_hidden_ratio=.nan', 'model.kwargs.phi_hidden_ratio'),
        ('model.kwargs.phi_kernel_size=4', 'model.kwargs.phi_kernel_size'),
        ('model.kwargs.phi_kernel_size=0', 'model.kwargs.phi_kernel_size'),
    ],
)
def test_bad_phi_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value).startswith(f'{key}: ') and '\n' not in str(err.value)


def test_phi_hidden_ratio_sets_phi_width_and_too_small_a_ratio_names_it():
    for ratio, width in ((1.0, 32), (2.0, 64), (4.0, 128), (0.5, 16)):
        student = build_student(load_config(TINY, [f'model.kwargs.phi_hidden_ratio={ratio}']))
        assert [b.phi.fc1.out_features for b in student.backbone.blocks if hasattr(b, 'phi')] == [width, width]
    with pytest.raises(ValueError, match='phi_hidden_ratio 0.01 leaves Phi no hidden channel'):
        build_student(load_config(TINY, ['model.kwargs.phi_hidden_ratio=0.01']))


@pytest.mark.slow
@pytest.mark.parametrize('ratio,attention', [(1.0, 'explicit'), (4.0, 'fused')])
def test_other_phi_ratios_and_explicit_attention_train(tmp_path, ratio, attention):
    """pretrain.py, one epoch of 2 iterations on real shards, with Phi's hidden width at 1x and 4x."""
    shards = write_pattern_shards(tmp_path / 'shards', n=64, n_shards=2)
    out = tmp_path / 'run'
    args = [
        f'data.train_shards={shards}',
        f'experiment.output_dir={out}',
        'data.samples_per_epoch=64',
        'train.epochs=1',
        'optim.warmup_epochs=0',
        'loss.warmup_teacher_temp_epochs=0',
        'optim.freeze_last_layer_epochs=0',
        f'model.kwargs.phi_hidden_ratio={ratio}',
        f'model.attention={attention}',
    ]
    proc = subprocess.run(
        [sys.executable, 'pretrain.py', '--config', TINY, *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / 'config.yaml').read_text())['model']['attention'] == attention
    blob = ckpt.load_file(ckpt.resolve_checkpoint(out) / ckpt.MODEL_FILE)
    width = int(32 * ratio)
    assert blob['student']['backbone.blocks.1.phi.fc1.weight'].shape == (width, 32)
    exports = sorted((out / 'export').glob('*.safetensors'))
    with safe_open(str(exports[-1]), framework='pt') as f:
        assert f.metadata()['attention'] == attention
        assert f.get_tensor('blocks.2.phi.fc2.weight').shape == (32, width)
    backbone, _ = ckpt.load_backbone(exports[-1])  # rebuilds from the recorded kwargs, Phi's width included
    assert backbone.blocks[1].phi.fc1.out_features == width
    losses = [rec['train/loss'] for rec in log_lines(out).values() if 'train/loss' in rec]
    assert losses and all(math.isfinite(v) for v in losses)
