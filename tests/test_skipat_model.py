"""SkipAt-ViT backbones: structure, counts, shapes and equivalences, against independent truths."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import skipssl  # noqa: F401  (registers the models)
from skipssl.models import (
    SkipAttentionBlock,
    SkipAttentionPhi,
    SkipAtVisionTransformer,
    convert_to_skipat,
    count_macs,
    count_params,
    get_last_selfattention,
    last_cls_tokens,
)

# SkipAt's structure (paper section 3) counted at 224 px, 197 tokens:
# (ViT params, SkipAt params, ViT MACs, SkipAt MACs).
REFERENCE_COUNTS = {
    'tiny': (5.72e6, 5.77e6, 1.25e9, 1.18e9),
    'small': (22.05e6, 22.16e6, 4.60e9, 4.44e9),
    'base': (86.57e6, 86.79e6, 17.56e9, 17.24e9),
}


def tiny_vit(**kwargs):
    """A small ViT for fast tests: 6 blocks, width 64."""
    args = dict(patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=0, dynamic_img_size=True)
    args.update(kwargs)
    return timm.create_model('vit_small_patch16_224', **args)


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_param_and_mac_counts_match_reference(size):
    vit_p, skip_p, vit_macs, skip_macs = REFERENCE_COUNTS[size]
    # the table counts the 1000-class ImageNet classifier, as timm's defaults build it
    vit = timm.create_model(f'vit_{size}_patch16_224')
    skip = timm.create_model(f'vit_{size}_patch16_skipat_224')
    assert count_params(vit) == pytest.approx(vit_p, rel=0.005)
    assert count_params(skip) == pytest.approx(skip_p, rel=0.005)
    assert count_macs(vit) == pytest.approx(vit_macs, rel=0.03)
    assert count_macs(skip) == pytest.approx(skip_macs, rel=0.03)
    assert count_macs(skip) < count_macs(vit)


def test_skipped_blocks_build_no_attention():
    model = timm.create_model('vit_small_patch16_skipat_224')
    assert model.skip_indices == (3, 4, 5, 6, 7, 8)
    for i, blk in enumerate(model.blocks):
        if i in model.skip_indices:
            assert isinstance(blk, SkipAttentionBlock)
            assert not hasattr(blk, 'attn') and not hasattr(blk, 'norm1')
        else:
            assert isinstance(blk, Block)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(f'blocks.{i}.attn') for i in model.skip_indices for n in names)


def test_every_parameter_gets_a_gradient_with_global_and_local_crops():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_skipat_224', num_classes=0, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 224, 224)).sum() + model(torch.randn(3, 3, 96, 96)).sum()
    out.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing}'


@pytest.mark.parametrize('hw', [(224, 224), (96, 96), (160, 224)])
def test_outputs_finite_for_dino_crop_sizes(hw):
    model = timm.create_model('vit_small_patch16_skipat_224', num_classes=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
        feats = model.forward_features(torch.randn(1, 3, *hw))
    assert out.shape == (2, 384)
    assert torch.isfinite(out).all()
    assert feats.shape == (1, 1 + (hw[0] // 16) * (hw[1] // 16), 384)


def reference_phi(phi: SkipAttentionPhi, x, grid):
    """Phi written out from the paper's description with plain tensor ops (unfold for the conv)."""
    B, N, _ = x.shape
    H, W = grid
    h = F.gelu(x @ phi.fc1.weight.T + phi.fc1.bias)  # (B, N, 2d)
    C = h.shape[-1]
    img = h.transpose(1, 2).reshape(B, C, H, W)  # row-major token grid
    k = phi.dwconv.kernel_size[0]
    patches = F.unfold(img, k, padding=k // 2).view(B, C, k * k, H * W)
    conv = (patches * phi.dwconv.weight.view(C, k * k, 1)).sum(2) + phi.dwconv.bias.view(C, 1)
    h = F.gelu(conv).transpose(1, 2)  # (B, N, 2d)
    y = h @ phi.fc2.weight.T + phi.fc2.bias
    m = y.mean(1)  # (B, d)
    w = phi.eca.conv.weight.view(-1)
    padded = F.pad(m, (1, 1))
    gate = torch.sigmoid(w[0] * padded[:, :-2] + w[1] * padded[:, 1:-1] + w[2] * padded[:, 2:])
    return y * gate[:, None, :]


@pytest.mark.parametrize('grid', [(4, 4), (3, 5)])
def test_phi_matches_written_out_reference(grid):
    torch.manual_seed(0)
    phi = SkipAttentionPhi(16)
    torch.nn.init.normal_(phi.dwconv.weight)
    torch.nn.init.normal_(phi.eca.conv.weight)
    x = torch.randn(2, grid[0] * grid[1], 16)
    torch.testing.assert_close(phi(x, grid), reference_phi(phi, x, grid))
    assert sum(p.numel() for p in SkipAttentionPhi(384).parameters()) == (
        384 * 768 + 768 + 768 * 25 + 768 + 768 * 384 + 384 + 3
    )
    with pytest.raises(ValueError, match='grid'):
        phi(x, (grid[0] + 1, grid[1]))


def test_forward_follows_skipat_definition():
    """Block-by-block reference: Z of the last computed block, chained through each block's Phi,
    prefix rows of the last computed Z reused, residual and MLP kept."""
    torch.manual_seed(0)
    model = convert_to_skipat(tiny_vit(reg_tokens=2), skip_indices=(2, 3, 5)).eval()
    x = torch.randn(2, 3, 40, 56)
    grid = (5, 7)
    p = model.num_prefix_tokens
    assert p == 3
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        z = None
        for blk in model.blocks:
            if isinstance(blk, SkipAttentionBlock):
                z = torch.cat([z[:, :p], reference_phi(blk.phi, z[:, p:], grid)], dim=1)
            else:
                z = blk.attn(blk.norm1(h))
            h = h + z
            h = h + blk.mlp(blk.norm2(h))
        expected = model.norm(h)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-4, atol=1e-5)


def test_empty_skip_list_is_identical_to_the_original_vit():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    conv = convert_to_skipat(vit, skip_indices=()).eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        assert torch.equal(conv(x), vit(x))
        a = vit.forward_intermediates(x, indices=3, return_prefix_tokens=True, norm=True)
        b = conv.forward_intermediates(x, indices=3, return_prefix_tokens=True, norm=True)
    assert torch.equal(a[0], b[0])
    for (sa, pa), (sb, pb) in zip(a[1], b[1]):
        assert torch.equal(sa, sb) and torch.equal(pa, pb)


def test_conversion_keeps_trained_weights():
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10)
    skip = convert_to_skipat(vit, skip_indices=(3, 4, 5, 6, 7, 8), dynamic_img_size=True)
    assert isinstance(skip, SkipAtVisionTransformer) and type(vit).__name__ == 'VisionTransformer'
    src, dst = vit.state_dict(), skip.state_dict()
    for name, value in dst.items():
        if '.phi.' in name:
            continue
        assert torch.equal(value, src[name]), name
    kept_attn = [n for n in dst if '.attn.' in n]
    assert {int(n.split('.')[1]) for n in kept_attn} == {0, 1, 2, 9, 10, 11}
    # skipped blocks keep their MLP weights
    assert torch.equal(dst['blocks.5.mlp.fc1.weight'], src['blocks.5.mlp.fc1.weight'])
    # the source model is untouched
    assert isinstance(vit.blocks[5], Block)
    # after switching on dynamic size the converted model takes DINO's local crops
    assert torch.isfinite(skip(torch.randn(1, 3, 96, 96))).all()


@pytest.mark.parametrize('bad, match', [((0, 3), 'block 0'), ((3, 12), 'out of range'), ((-1,), 'out of range')])
def test_bad_skip_indices_fail_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('vit_tiny_patch16_skipat_224', skip_indices=bad)
    with pytest.raises(ValueError, match=match):
        convert_to_skipat(timm.create_model('vit_tiny_patch16_224'), skip_indices=bad)


def test_conversion_rejects_non_vit_and_pretrained_request():
    with pytest.raises(TypeError, match='VisionTransformer'):
        convert_to_skipat(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('vit_small_patch16_skipat_224', pretrained=True)


def test_exported_teacher_loads_through_timms_local_weight_conventions(tmp_path):
    """An export of the trainer (skipssl.checkpoint.save_backbone) is a timm checkpoint: pretrained=True with
    pretrained_cfg_overlay=dict(file=...), and checkpoint_path=, give the exported weights exactly."""
    from skipssl.checkpoint import save_backbone
    from skipssl_common.artefacts import ExportMeta

    kwargs = dict(img_size=32, depth=4, embed_dim=48, num_heads=2, skip_indices=(1, 2))
    torch.manual_seed(0)
    teacher = timm.create_model('vit_tiny_patch16_skipat_224', num_classes=0, **kwargs).eval()
    path = save_backbone(
        teacher,
        tmp_path / 'teacher.safetensors',
        ExportMeta('vit_tiny_patch16_skipat_224', dict(kwargs, skip_indices=[1, 2]), iteration=1),
    )
    x = torch.randn(2, 3, 32, 32)
    for extra in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), dict(checkpoint_path=str(path))):
        torch.manual_seed(1)  # other random weights, unless the file's are loaded
        model = timm.create_model('vit_tiny_patch16_skipat_224', num_classes=0, **kwargs, **extra).eval()
        assert model.state_dict().keys() == teacher.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))
        assert torch.equal(model(x), teacher(x))


def test_registry_passes_timm_kwargs_through():
    model = timm.create_model(
        'vit_small_patch16_skipat_224', skip_indices=(4, 5), drop_path_rate=0.2, num_classes=7, img_size=96
    )
    assert model.skip_indices == (4, 5)
    assert model.patch_embed.img_size == (96, 96)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model(torch.randn(1, 3, 224, 160)).shape == (1, 7)
    assert 'vit_base_patch16_skipat_224' in timm.list_models('*_skipat_*')


def test_last_cls_tokens_are_normed_cls_of_last_blocks():
    torch.manual_seed(0)
    model = convert_to_skipat(tiny_vit(), skip_indices=(2, 3)).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.last_cls_tokens(x, n=4)
    assert feats.shape == (2, 4 * 64)
    # independent route: collect block outputs by hooks on a plain forward
    outs = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for blk in model.blocks
    ]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    expected = torch.cat([model.norm(o)[:, 0] for o in outs[-4:]], dim=-1)
    torch.testing.assert_close(feats.detach(), expected)


def test_last_selfattention_reconstructs_the_attention_output():
    torch.manual_seed(0)
    model = convert_to_skipat(tiny_vit(), skip_indices=(2, 3)).eval()
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
        n_tok = 1 + 4 * 3
        assert attn.shape == (2, 4, n_tok, n_tok)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, n_tok))
        # attn @ v then proj must equal the last block's (fused) attention output on the same input
        inp = model.forward_intermediates(
            x, indices=[4], output_fmt='NLC', return_prefix_tokens=True, intermediates_only=True
        )[0]
        h = torch.cat([inp[1], inp[0]], dim=1)
        last = model.blocks[-1]
        y = last.norm1(h)
        v = last.attn.qkv(y).reshape(2, n_tok, 3, 4, 16)[:, :, 2].transpose(1, 2)
        out = last.attn.proj((attn @ v).transpose(1, 2).reshape(2, n_tok, 64))
        torch.testing.assert_close(out, last.attn(y), rtol=1e-4, atol=1e-5)
    skipped_last = convert_to_skipat(tiny_vit(), skip_indices=(5,))
    with pytest.raises(ValueError, match='skipped'):
        get_last_selfattention(skipped_last, x)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = convert_to_skipat(tiny_vit(), skip_indices=(2, 3, 4))
    x = torch.randn(2, 3, 32, 40)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_last_cls_tokens_helper_works_on_plain_timm_vit():
    vit = tiny_vit().eval()
    assert last_cls_tokens(vit, torch.randn(1, 3, 32, 32), n=2).shape == (1, 128)


# -- timm's model contract: scripting, FX tracing, features, classifier reset (timm's own suite runs the
# registered models in tests/test_timm_suite.py; these cover a converted model too, and exactness) ----------
def _fx_model(model, train=False):
    """timm's FX set-up for its model tests: the graph's output node as a feature extractor."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer
    ).train(train)


def _contract_models():
    torch.manual_seed(0)
    registered = timm.create_model('vit_tiny_patch16_skipat_224', depth=6, skip_indices=(2, 3, 4), num_classes=7).eval()
    converted = convert_to_skipat(tiny_vit(num_classes=7, reg_tokens=2), skip_indices=(1, 2)).eval()
    return {'registered': registered, 'converted': converted}


@pytest.mark.parametrize('which', ['registered', 'converted'])
def test_scripted_and_traced_models_equal_eager(which):
    model = _contract_models()[which]
    x = torch.randn(2, 3, 224, 224) if which == 'registered' else torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        eager = model(x)
        scripted = torch.jit.script(model)(x)
        traced = _fx_model(model)
        fx = next(iter(traced(x).values()))
        fx_scripted = next(iter(torch.jit.script(traced)(x).values()))
    for name, out in (('script', scripted), ('fx', fx), ('fx+script', fx_scripted)):
        torch.testing.assert_close(out, eager, rtol=0, atol=0, msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.parametrize('which', ['registered', 'converted'])
def test_fx_backward_reaches_every_parameter_as_eager(which):
    model = _contract_models()[which].train()
    x = torch.randn(2, 3, 64, 64)
    traced = _fx_model(model, train=True)
    torch.manual_seed(1)
    next(iter(traced(x).values())).mean().backward()
    fx_grads = {n: p.grad.clone() for n, p in traced.named_parameters()}
    model.zero_grad()
    torch.manual_seed(1)
    model(x).mean().backward()
    assert fx_grads.keys() == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(fx_grads[n], p.grad, msg=lambda m, n=n: f'{n}: {m}')


def test_features_only_reset_classifier_and_causal_refusal():
    model = timm.create_model('vit_tiny_patch16_skipat_224', depth=6, skip_indices=(2, 3), features_only=True)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [torch.Size([1, 192, 4, 4])] * 3  # blocks 3, 4, 5 as NCHW maps
    assert model.feature_info.channels() == [192] * 3
    clf = timm.create_model('vit_tiny_patch16_skipat_224', depth=4, skip_indices=(2,), num_classes=5)
    clf.reset_classifier(11)
    assert clf(torch.randn(1, 3, 32, 32)).shape == (1, 11)
    clf.reset_classifier(0)
    assert clf(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    with pytest.raises(AssertionError, match='causal'):
        clf.forward_features(torch.randn(1, 3, 32, 32), is_causal=True)


def test_old_model_names_still_build_with_a_deprecation_warning():
    with pytest.warns(UserWarning, match='deprecated model name skipat_vit_tiny_patch16_224'):
        model = timm.create_model('skipat_vit_tiny_patch16_224', depth=4, skip_indices=(2,))
    assert isinstance(model, SkipAtVisionTransformer) and 'skipat_vit_tiny_patch16_224' not in timm.list_models()
