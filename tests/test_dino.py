"""DINO method pieces against plain formulas (Caron et al. 2021 and DINO's main_dino.py / utils.py)."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import skipssl  # noqa: F401
from skipssl.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    apply_schedules,
    clip_gradients_per_param,
    collapse_state,
    cosine_schedule,
    ema_update,
    epoch_warmup_schedule,
    linear_warmup_schedule,
    make_teacher,
    matching_parameters,
    param_groups,
    reset_frozen_state,
    scaled_lr,
)


def reference_dino_loss(student_out, teacher_out, center, teacher_temp, student_temp, n_crops, momentum):
    """DINO's loss and centre update written as the paper's loops."""
    student = (student_out / student_temp).chunk(n_crops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(n_crops):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            n_terms += 1
    new_center = center * momentum + teacher_out.mean(0, keepdim=True) * (1 - momentum)
    return total / n_terms, new_center


@pytest.mark.parametrize('n_crops, batch, out_dim', [(2, 1, 16), (4, 3, 32), (12, 5, 64)])
def test_loss_and_center_match_loop_reference(n_crops, batch, out_dim):
    torch.manual_seed(n_crops)
    loss_fn = DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)
    center = torch.randn(1, out_dim) * 0.1
    loss_fn.center.copy_(center)
    for step in range(3):  # several steps: the centre carries over
        s = torch.randn(n_crops * batch, out_dim)
        t = torch.randn(2 * batch, out_dim)
        expected, center = reference_dino_loss(s, t, center, 0.04 + 0.01 * step, 0.1, n_crops, 0.9)
        got = loss_fn(s, t, 0.04 + 0.01 * step)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.center, center)


def test_centre_moves_once_per_step_from_all_micro_batches():
    """K forwards with update_center=False, then one update: the centre of one batch of K x B."""
    torch.manual_seed(0)
    K, B, out_dim = 3, 4, 16
    s, t = torch.randn(K, 4 * B, out_dim), torch.randn(K, 2 * B, out_dim)
    accumulated, whole = DINOLoss(out_dim), DINOLoss(out_dim)
    for k in range(K):
        accumulated(s[k], t[k], 0.04, update_center=False)
    assert torch.equal(accumulated.center, torch.zeros(1, out_dim))  # the loss of every micro-batch used c
    accumulated.update_center()
    whole(torch.cat(list(s)), torch.cat(list(t)), 0.04)
    torch.testing.assert_close(accumulated.center, whole.center)
    torch.testing.assert_close(accumulated.center, 0.1 * t.reshape(-1, out_dim).mean(0, keepdim=True))
    with pytest.raises(RuntimeError, match='without a forward'):
        accumulated.update_center()


def test_teacher_temperature_is_dinos_per_epoch_warm_up():
    temp = epoch_warmup_schedule(0.04, 0.07, epochs=5, warmup_epochs=3, iterations_per_epoch=4)
    # DINO: np.linspace(0.04, 0.07, 3) then 0.07, indexed by the epoch
    expected = np.concatenate((np.linspace(0.04, 0.07, 3), np.full(2, 0.07)))
    np.testing.assert_array_equal(temp, np.repeat(expected, 4))
    np.testing.assert_array_equal(epoch_warmup_schedule(0.04, 0.04, 2, 0, 3), np.full(6, 0.04))


def test_frozen_state_reset_makes_the_first_update_a_fresh_adamw_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), DINOHead(8, out_dim=16, hidden_dim=8, bottleneck_dim=4))
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), DINOHead(8, out_dim=16, hidden_dim=8, bottleneck_dim=4))
    fresh.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(param_groups(model))
    for _ in range(3):  # frozen steps: lr 0 on the last layer, its state reset after each
        apply_schedules(opt, lr=1e-2, weight_decay=0.04, freeze_last_layer=True)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        reset_frozen_state(opt)
    last = model[1].last_layer.weight_v
    assert all(float(v.abs().sum()) == 0 for v in opt.state[last].values())
    # first unfrozen step: the last layer moves exactly as under a brand-new AdamW with the same gradient
    apply_schedules(opt, lr=1e-2, weight_decay=0.04, freeze_last_layer=False)
    x = torch.randn(2, 4)
    model(x).sum().backward()
    fresh_last = fresh[1].last_layer.weight_v
    fresh_last.grad = last.grad.clone()
    torch.optim.AdamW([fresh_last], lr=1e-2, weight_decay=0.04).step()
    opt.step()
    assert torch.equal(last, fresh_last)


def test_loss_gradient_matches_reference():
    torch.manual_seed(0)
    s = torch.randn(6 * 4, 32, requires_grad=True)
    t = torch.randn(2 * 4, 32)
    DINOLoss(32)(s, t, 0.07).backward()
    g = s.grad.clone()
    s.grad = None
    reference_dino_loss(s, t, torch.zeros(1, 32), 0.07, 0.1, 6, 0.9)[0].backward()
    torch.testing.assert_close(g, s.grad, rtol=1e-5, atol=1e-7)


def test_loss_low_for_matching_views_and_ln_k_for_uniform_student():
    K, B = 256, 8
    logits = F.one_hot(torch.randint(0, K, (B,)), K).float() * 10
    loss_fn = DINOLoss(K)
    same = loss_fn(torch.cat([logits, logits]), torch.cat([logits, logits]), teacher_temp=0.04)
    assert same < 0.01
    uniform = DINOLoss(K)(torch.zeros(4 * B, K), torch.randn(2 * B, K), teacher_temp=0.04)
    assert uniform.item() == pytest.approx(math.log(K), rel=1e-5)


def test_loss_is_safe_in_half_precision():
    torch.manual_seed(0)
    s = (torch.randn(4 * 8, 4096) * 30).to(torch.bfloat16)
    t = (torch.randn(2 * 8, 4096) * 30).to(torch.float16)
    loss = DINOLoss(4096)(s, t, teacher_temp=0.04)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected, _ = reference_dino_loss(s.float(), t.float(), torch.zeros(1, 4096), 0.04, 0.1, 4, 0.9)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='out_dim'):
        DINOLoss(16)(torch.randn(8, 16), torch.randn(4, 8), 0.04)
    with pytest.raises(ValueError, match='multiple'):
        DINOLoss(16)(torch.randn(7, 16), torch.randn(4, 16), 0.04)


def test_center_is_a_saved_buffer():
    loss_fn = DINOLoss(8)
    loss_fn(torch.randn(8, 8), torch.randn(4, 8) + 3, 0.04)
    restored = DINOLoss(8)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.center, loss_fn.center) and restored.center.abs().sum() > 0


def test_collapse_monitors_detect_both_collapse_modes():
    K, B = 1024, 16
    loss_fn = DINOLoss(K)
    # teacher collapsed to uniform: identical logits everywhere
    loss_fn(torch.randn(4 * B, K), torch.zeros(2 * B, K), teacher_temp=0.04)
    m = {k: v.item() for k, v in loss_fn.metrics.items()}
    assert m['teacher_entropy'] == pytest.approx(math.log(K), rel=1e-4)
    assert collapse_state(m, K) == 'uniform'
    # teacher collapsed to one prototype for every image
    one = torch.full((2 * B, K), -50.0)
    one[:, 3] = 50.0
    loss_fn = DINOLoss(K)
    loss_fn(torch.randn(4 * B, K), one, teacher_temp=0.04)
    m = {k: v.item() for k, v in loss_fn.metrics.items()}
    assert m['teacher_entropy'] < 1e-3 and collapse_state(m, K) == 'one-hot'
    # healthy: sharp per image, different prototypes across images
    healthy = torch.randn(2 * B, K) * 0.2
    healthy[torch.arange(2 * B), torch.randperm(K)[: 2 * B]] += 1.0
    loss_fn = DINOLoss(K)
    loss_fn(torch.randn(4 * B, K), healthy, teacher_temp=0.04)
    m = {k: v.item() for k, v in loss_fn.metrics.items()}
    assert collapse_state(m, K) is None
    assert m['kl'] > 0 and m['center_norm'] > 0


def test_head_structure_and_fixed_last_layer_norm():
    head = DINOHead(384)
    n_mlp = 384 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256
    assert sum(p.numel() for p in head.parameters()) == n_mlp + 256 * 65536
    assert head(torch.randn(3, 384)).shape == (3, 65536)

    torch.manual_seed(0)
    head = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    for _ in range(5):
        head(torch.randn(4, 32)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))
    # bottleneck output is L2-normalised before the last layer: logits bounded by the row norms
    assert head(torch.randn(10, 32) * 100).abs().max() <= 1.0 + 1e-5

    free = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=False)
    assert 'last_layer.weight_g' in dict(free.named_parameters())
    assert DINOHead(32, out_dim=8, nlayers=1).mlp.out_features == 256


class _DINOHeadLayout(torch.nn.Module):
    """DINO's own DINOHead (main_dino.py / vision_transformer.py, no batch norm), rebuilt with the modules it
    uses: an MLP in ``mlp`` (Linear, GELU, ..., Linear) and ``nn.utils.weight_norm`` on a bias-free Linear, whose
    ``weight_g`` DINO fills with 1 (and freezes with norm_last_layer)."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden_dim),
            torch.nn.GELU(),
            torch.nn.Linear(hidden_dim, hidden_dim),
            torch.nn.GELU(),
            torch.nn.Linear(hidden_dim, bottleneck_dim),
        )
        with pytest.warns(FutureWarning):  # torch's deprecated weight_norm is the one DINO's checkpoints come from
            self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


@pytest.mark.parametrize('norm_last_layer', [True, False])
def test_head_loads_a_state_dict_in_dinos_layout(norm_last_layer):
    torch.manual_seed(0)
    dino = _DINOHeadLayout(32, 64, 48, 16, norm_last_layer)
    if not norm_last_layer:  # a trained free gain
        dino.last_layer.weight_g.data.uniform_(0.5, 2.0)
    state = dino.state_dict()
    assert sorted(state) == sorted(
        [f'mlp.{i}.{p}' for i in (0, 2, 4) for p in ('weight', 'bias')] + ['last_layer.weight_g', 'last_layer.weight_v']
    )
    head = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    head.load_state_dict(state)  # strict
    x = torch.randn(5, 32)
    torch.testing.assert_close(head(x), dino(x), rtol=1e-6, atol=1e-6)
    if norm_last_layer:  # the fixed gain is no state of ours: our own state dict round-trips without it
        assert 'last_layer.weight_g' not in head.state_dict()
        head.load_state_dict(head.state_dict())


def test_head_with_a_fixed_norm_refuses_trained_gains():
    torch.manual_seed(0)
    dino = _DINOHeadLayout(32, 64, 48, 16, norm_last_layer=False)
    dino.last_layer.weight_g.data.uniform_(0.5, 2.0)
    head = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=True)
    with pytest.raises(RuntimeError, match=r'last_layer.weight_g: the gains are not all 1 .*norm_last_layer=False'):
        head.load_state_dict(dino.state_dict())


def test_multicrop_wrapper_runs_backbone_once_per_resolution():
    torch.manual_seed(0)
    backbone = timm.create_model('vit_tiny_patch16_skipat_224', num_classes=0, depth=4, skip_indices=(2,)).eval()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    head = DINOHead(192, out_dim=32, hidden_dim=64, bottleneck_dim=16)
    model = MultiCropWrapper(backbone, head)
    crops = [torch.randn(2, 3, 64, 64) for _ in range(2)] + [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with torch.no_grad():
        out = model(crops)
        per_crop = torch.cat([head(backbone(c)) for c in crops])
    assert out.shape == (5 * 2, 32)
    assert [tuple(s) for s in calls[:2]] == [(4, 3, 64, 64), (6, 3, 32, 32)]
    torch.testing.assert_close(out, per_crop, rtol=1e-4, atol=1e-5)


def test_schedules_at_warmup_end_midpoint_and_end():
    base, final, total, warm = 5e-4, 1e-6, 1000, 100
    s = cosine_schedule(base, final, total, warm, start_warmup_value=0.0)
    assert len(s) == total
    assert s[0] == 0.0 and s[warm - 1] == pytest.approx(base) and s[warm] == pytest.approx(base)
    n = total - warm
    assert s[warm + n // 2] == pytest.approx((base + final) / 2)
    assert s[-1] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * (n - 1) / n)))
    assert np.all(np.diff(s[warm:]) <= 0)
    momentum = cosine_schedule(0.996, 1.0, 500)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0, abs=1e-7)
    temp = linear_warmup_schedule(0.04, 0.07, 300, 30)
    assert temp[0] == 0.04 and temp[29] == pytest.approx(0.07) and np.all(temp[29:] == pytest.approx(0.07))
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match='warmup_iters'):
        cosine_schedule(1, 0, 10, warmup_iters=11)


def test_ema_teacher_momentum_extremes_and_no_drop_path():
    torch.manual_seed(0)
    student = torch.nn.Sequential(
        timm.create_model('vit_tiny_patch16_224', num_classes=0, depth=2, drop_path_rate=0.5),
        DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8),
    )
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(type(m).__name__ == 'DropPath' for m in teacher.modules())
    t_params, s_params = matching_parameters(teacher, student)
    with torch.no_grad():
        for p in s_params:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in t_params]
    ema_update(t_params, s_params, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(t_params, before))
    ema_update(t_params, s_params, momentum=0.5)
    for t, b, s in zip(t_params, before, s_params):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    ema_update(t_params, s_params, momentum=0.0)
    assert all(torch.equal(t, s) for t, s in zip(t_params, s_params))
    # a bf16 student (engine working copy) still updates an fp32 teacher
    ema_update(t_params, [s.bfloat16() for s in s_params], momentum=0.0)
    assert all(t.dtype == torch.float32 for t in t_params)


def test_per_parameter_gradient_clipping():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([0.3, 0.4, 0.0])  # norm 0.5: untouched
    b.grad = torch.full((2, 2), 5.0)  # norm 10: scaled to 3
    norms = clip_gradients_per_param([a, b], 3.0)
    torch.testing.assert_close(norms, torch.tensor([0.5, 10.0]))
    torch.testing.assert_close(a.grad, torch.tensor([0.3, 0.4, 0.0]))
    assert b.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(b.grad / b.grad.norm(), torch.full((2, 2), 0.5))


def test_param_groups_weight_decay_and_last_layer_freeze():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        timm.create_model('vit_tiny_patch16_224', num_classes=0, depth=1),
        DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8),
    )
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g['params']:
            n = names[id(p)]
            assert g['apply_wd'] == (not n.endswith('.bias') and p.ndim > 1), n
            assert g['last_layer'] == ('last_layer' in n)
    assert sum(len(g['params']) for g in groups) == len(names)

    opt = torch.optim.AdamW(groups, lr=1.0)
    last = model[1].last_layer.weight_v
    before, other_before = last.detach().clone(), model[0].patch_embed.proj.weight.detach().clone()
    apply_schedules(opt, lr=1e-2, weight_decay=0.04, freeze_last_layer=True)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    opt.step()
    assert torch.equal(last, before)
    assert not torch.equal(model[0].patch_embed.proj.weight, other_before)
    apply_schedules(opt, lr=1e-2, weight_decay=0.04, freeze_last_layer=False)
    assert {g['name']: (g['lr'], g['weight_decay']) for g in opt.param_groups}['no_decay'] == (1e-2, 0.0)
    assert all(g['lr'] == 1e-2 for g in opt.param_groups)
