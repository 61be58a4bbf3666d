"""The GPU cost model (bench.cost_model): ops recorded at the dispatcher on fake tensors, their FLOPs and bytes,
the roofline arithmetic, and the calibration on the paper's ViT-T row only."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.cost_model import __main__ as cli
from bench.cost_model.record import OpCost, OpRecorder
from bench.cost_model.roofline import Device, calibrate, op_time, predicted_img_per_s, roofline
from bench.cost_model.workloads import record_backbone, record_dino_step, set_attention


def _record(fn, *shapes, dtype=torch.float32):
    with FakeTensorMode():
        xs = [torch.empty(s, dtype=dtype) for s in shapes]
        with OpRecorder() as rec:
            fn(*xs)
    return rec.ops


def _gmacs(ops, batch=1):
    return sum(o.flops for o in ops) / 2 / batch / 1e9


@pytest.mark.parametrize(
    'name, gmacs',
    [
        ('vit_tiny_patch16_224', 1.25),
        ('vit_tiny_patch16_skipat_224', 1.18),
        ('vit_small_patch16_224', 4.60),
        ('vit_small_patch16_skipat_224', 4.44),
    ],
)
def test_forward_flops_match_the_known_mac_counts(name, gmacs):
    ops = record_backbone(name, 'explicit', 2, 'fp32')
    # the reference table rounds to 0.01 GMACs (SkipAt-T counts 1.174)
    assert _gmacs(ops, 2) == pytest.approx(gmacs, rel=0.005)


@pytest.mark.parametrize('mode', ['infer', 'train'])
def test_fused_attention_counts_the_explicit_forms_matmul_flops(mode):
    name = 'vit_small_patch16_skipat_224'  # 6 blocks with attention, 6 heads of 64, 197 tokens
    fused = record_backbone(name, 'fused', 1, 'fp32', mode_name=mode)
    explicit = record_backbone(name, 'explicit', 1, 'fp32', mode_name=mode)
    assert any(o.op.startswith('_scaled_dot_product') for o in fused)
    assert not any(o.op.startswith('_scaled_dot_product') for o in explicit)
    # the fused backward also recomputes q @ k^T (torch's formula counts it, as FlashAttention runs it)
    recompute = 6 * 2 * 6 * 197 * 197 * 64 if mode == 'train' else 0
    assert sum(o.flops for o in fused) == sum(o.flops for o in explicit) + recompute
    # the fused kernel never writes the N x N matrix: less traffic
    assert sum(o.bytes for o in fused) < sum(o.bytes for o in explicit)


def test_fused_attention_op_bytes_are_q_k_v_out_and_logsumexp():
    B, H, N, d = 2, 3, 50, 16
    ops = _record(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *[(B, H, N, d)] * 3, dtype=torch.bfloat16)
    (attn,) = [o for o in ops if o.op.startswith('_scaled_dot_product')]
    assert attn.flops == 4 * B * H * N * N * d
    assert attn.bytes_read == 3 * B * H * N * d * 2
    assert attn.bytes_written == B * H * N * d * 2 + B * H * N * 4  # out (bf16) + logsumexp (fp32)


def test_matmul_and_softmax_bytes_by_hand():
    M, K, N = 64, 32, 48
    (mm,) = _record(torch.mm, (M, K), (K, N))
    assert (mm.op, mm.flops, mm.bytes_read, mm.bytes_written) == ('mm', 2 * M * K * N, 4 * (M * K + K * N), 4 * M * N)
    (sm,) = _record(lambda x: x.softmax(-1), (8, 197, 197), dtype=torch.float16)
    assert (sm.flops, sm.bytes_read, sm.bytes_written) == (0, 2 * 8 * 197 * 197, 2 * 8 * 197 * 197)


def test_views_are_free_and_broadcast_operands_are_read_once():
    ops = _record(lambda x, b: (x.transpose(0, 1).reshape(-1).view(32, 64) * 2, x + b), (64, 32), (32,))
    # transpose is a view; the reshape of the transposed tensor is a real copy, the final view is free
    assert [o.op for o in ops] == ['clone', 'mul', 'add']
    assert ops[2].bytes_read == 4 * (64 * 32 + 32)


def test_grouped_convolution_backward_counts_one_forward_per_gradient():
    x_shape, w_shape = (2, 8, 14, 14), (8, 1, 5, 5)

    def run(x, w):
        x.requires_grad_(True)
        w.requires_grad_(True)
        F.conv2d(x, w, padding=2, groups=8).sum().backward()

    ops = _record(run, x_shape, w_shape)
    forward = 2 * 2 * 8 * 14 * 14 * 25
    assert [o.flops for o in ops if o.op == 'convolution'] == [forward]
    assert [o.flops for o in ops if o.op == 'convolution_backward'] == [2 * forward]


def test_explicit_timm054_scales_the_attention_matrix():
    ops = {kind: record_backbone('vit_tiny_patch16_224', kind, 1, 'fp16') for kind in ('explicit', 'explicit_timm054')}
    n2 = 3 * 197 * 197  # one block's attention matrix
    diff = sum(o.bytes for o in ops['explicit_timm054']) - sum(o.bytes for o in ops['explicit'])
    # one more pass over the fp16 matrix per block, instead of scaling q (197 x 64 per head)
    assert diff == 12 * (2 * 2 * n2 - 2 * 2 * 3 * 197 * 64)


def test_cuda_autocast_runs_softmax_in_fp32():
    ops = record_backbone('vit_tiny_patch16_224', 'explicit', 1, 'fp16')
    assert {o.dtype for o in ops if o.op == '_softmax'} == {'float32'}
    assert {o.dtype for o in ops if o.op in ('bmm', 'addmm')} == {'float16'}


def test_unknown_attention_kind_is_refused():
    with pytest.raises(ValueError, match="attention kind 'flash' is not one of"):
        set_attention(torch.nn.Linear(1, 1), 'flash')


def test_roofline_of_a_toy_op_table():
    dev = Device('toy', peak_fp16=100.0, peak_tf32=50.0, bandwidth=10.0)
    ops = [
        OpCost('mm', flops=1000, bytes_read=20, bytes_written=10, dtype='float16'),  # compute: 10 s > 3 s
        OpCost('mm', flops=1000, bytes_read=20, bytes_written=10, dtype='float32'),  # compute at tf32: 20 s
        OpCost('add', flops=0, bytes_read=80, bytes_written=40, dtype='float16'),  # memory: 12 s
    ]
    assert [op_time(o, dev) for o in ops] == [10.0, 20.0, 12.0]
    r = roofline(ops, dev)
    assert (r.seconds, r.compute_bound_seconds, r.memory_bound_seconds) == (42.0, 30.0, 12.0)
    assert (r.flops, r.bytes, r.kernels) == (2000, 180, 3)
    eff = calibrate(r.seconds, images=84, measured_img_per_s=1.0)
    assert eff == 0.5 and predicted_img_per_s(r.seconds, 84, eff) == 1.0


def test_calibration_reads_only_vit_tinys_row(monkeypatch):
    seconds = {'vit_tiny_patch16_224': 2.0, 'vit_tiny_patch16_skipat_224': 1.0}
    seconds.update(vit_small_patch16_224=4.0, vit_small_patch16_skipat_224=3.0)
    monkeypatch.setattr(cli, 'record_backbone', lambda name, *a, **k: [OpCost(name, 0, 0, 0, 'float16')])
    monkeypatch.setattr(cli, 'roofline', lambda ops, dev: type('R', (), {'seconds': seconds[ops[0].op]}))
    base = cli.paper_check('fp16', 'explicit')
    # other rows of the paper's table change the predictions' errors, never the efficiency or the predictions
    monkeypatch.setitem(cli.PAPER, ('vit', 'small'), 1.0)
    monkeypatch.setitem(cli.PAPER, ('skipat', 'small'), 1.0)
    monkeypatch.setitem(cli.PAPER, ('skipat', 'tiny'), 1.0)
    other = cli.paper_check('fp16', 'explicit')
    assert other.efficiency == base.efficiency == pytest.approx(5800 * 2.0 / 1024)
    assert [r['predicted_img_per_s'] for r in other.rows] == [r['predicted_img_per_s'] for r in base.rows]
    monkeypatch.setitem(cli.PAPER, ('vit', 'tiny'), 2900.0)
    assert cli.paper_check('fp16', 'explicit').efficiency == pytest.approx(base.efficiency / 2)


def test_dino_step_records_every_part_of_the_step():
    ops = record_dino_step('vit_tiny_patch16_skipat_224', 'fused', 2)
    names = {o.op for o in ops}
    assert {'_fused_adamw_', '_log_softmax', 'convolution_backward', '_foreach_copy_'} <= names
    assert {
        '_scaled_dot_product_flash_attention_for_cpu',
        '_scaled_dot_product_flash_attention_for_cpu_backward',
    } <= names
    # AdamW reads params, grads, both moments and the step counts; writes params and moments: 7 fp32 per param
    (adam,) = [o for o in ops if o.op == '_fused_adamw_']
    head = 192 * 2048 + 2048 * 2048 + 2048 * 256 + 2048 * 2 + 256 + 256 * 65536
    n = 5_580_882 + head  # SkipAt-T without classifier, DINO's head
    assert adam.bytes == pytest.approx(7 * 4 * n, rel=0.01)
