"""CKA between ViT blocks (skipssl.analysis): the estimator against independent truth (the U-statistic definition
of the unbiased HSIC, the population CKA of a Gaussian model, Kornblith et al.'s full-batch linear CKA), its
invariances, the capture hooks against the model's own outputs, the exact skip choice against brute force, a
planted redundancy, and the command end to end on real shards."""

import itertools
import json

import numpy as np
import pytest
import timm
import torch

from skipssl.analysis.capture import BlockCapture, block_kinds, gram
from skipssl.analysis.cka import StreamingCKA, choose_skips, measure, unbiased_hsic
from skipssl.checkpoint import build_backbone
from skipssl.models import get_last_selfattention
from skipssl_eval.cka import main
from skipssl_eval.synthetic import write_shards

KWARGS = {'img_size': 16, 'patch_size': 4, 'depth': 6, 'embed_dim': 32, 'num_heads': 2, 'in_chans': 1}


def linear_cka_full_batch(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, linear CKA of centred features: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.sum((y.T @ x) ** 2) / np.linalg.norm(x.T @ x) / np.linalg.norm(y.T @ y))


def streamed_cka(features, batch: int) -> np.ndarray:
    """CKA matrix of several (N, D) float64 feature arrays, fed in minibatches of ``batch`` rows."""
    stream = StreamingCKA()
    tensors = [torch.from_numpy(f) for f in features]
    for start in range(0, len(features[0]), batch):
        stream.update(torch.stack([t[start : start + batch] @ t[start : start + batch].T for t in tensors]))
    return stream.cka().numpy()


def test_unbiased_hsic_is_the_u_statistic():
    """Song et al. 2012: HSIC_1 is the U-statistic of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq over distinct
    (i, j, q, r); the closed form (all layer pairs at once) must equal it to rounding."""
    rng = np.random.default_rng(0)
    n = 7
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 4)) + rng.normal(size=(n, 1))
    k, m = x @ x.T, y @ y.T
    terms = [
        k[i, j] * m[i, j] + k[i, j] * m[q, r] - 2 * k[i, j] * m[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    ]
    expected = np.mean(terms)
    got = unbiased_hsic(torch.from_numpy(np.stack([k, m]))).numpy()
    assert got[0, 1] == pytest.approx(expected, rel=1e-10)
    assert got[1, 0] == pytest.approx(expected, rel=1e-10)
    assert got[0, 0] == pytest.approx(
        np.mean(
            [
                k[i, j] ** 2 + k[i, j] * k[q, r] - 2 * k[i, j] * k[i, q]
                for i, j, q, r in itertools.permutations(range(n), 4)
            ]
        ),
        rel=1e-10,
    )


def test_cka_is_one_with_itself_and_invariant_to_rotation_and_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 12))
    y = np.tanh(x @ rng.normal(size=(12, 9))) + 0.5 * rng.normal(size=(256, 9))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))  # an orthogonal matrix
    m = streamed_cka([x, 3.7 * x @ q, y, 0.01 * y], batch=32)
    assert m[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-10)  # rotated and scaled copy of itself
    assert m[2, 3] == pytest.approx(1.0, abs=1e-10)
    assert m[1, 2] == pytest.approx(m[0, 2], abs=1e-10)  # CKA(XQs, Y) = CKA(X, Y)
    assert m[1, 3] == pytest.approx(m[0, 2], abs=1e-10)
    assert 0.1 < m[0, 2] < 0.99


def test_streamed_estimate_agrees_with_full_batch_and_population_cka():
    """X ~ N(0, Sx), Y = X W + noise: population linear CKA ||Sxy||^2 / (||Sx|| ||Syy||) in closed form.

    Both estimators converge to it. Tolerances from 30 seeds of this very set-up (N 8192, batch 128): the
    streamed estimate has std 0.0047 around the population value (mean offset 0.0007), its difference to the
    full-batch CKA of the same data std 0.0014 (max 0.0045 in 30); the test allows 5 std.
    """
    rng = np.random.default_rng(0)
    d, noise = 6, 4.0
    sx, w = np.diag(np.linspace(0.5, 2, d)), rng.normal(size=(d, 5))
    syy = w.T @ sx @ w + noise * np.eye(5)
    population = np.sum((sx @ w) ** 2) / np.linalg.norm(sx) / np.linalg.norm(syy)
    g = np.random.default_rng(1)
    x = g.normal(size=(8192, d)) @ np.sqrt(sx)
    y = x @ w + np.sqrt(noise) * g.normal(size=(8192, 5))
    streamed = streamed_cka([x, y], batch=128)[0, 1]
    assert abs(streamed - linear_cka_full_batch(x, y)) < 5 * 0.0014
    assert abs(streamed - population) < 5 * 0.0047


def brute_force_skips(m: np.ndarray, k: int):
    """Best subset by enumeration: the score of a skipped block is its CKA with the last computed block before it."""
    best = (-np.inf, None)
    for subset in itertools.combinations(range(1, len(m)), k):
        score = sum(m[j, max(i for i in range(j) if i not in subset)] for j in subset)
        best = max(best, (score, list(subset)), key=lambda v: v[0])
    return best


def test_exact_skip_choice_matches_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(5):
        a = rng.uniform(0.3, 1.0, size=(8, 8))
        m = (a + a.T) / 2
        np.fill_diagonal(m, 1.0)
        for k in range(0, 8):
            chosen, score = choose_skips(m.tolist(), k)
            expected_score, _ = brute_force_skips(m, k)
            assert score == pytest.approx(expected_score, abs=1e-12)
            assert len(chosen) == k and 0 not in chosen
    with pytest.raises(ValueError, match='never block 0'):
        choose_skips(np.eye(4).tolist(), 4)


def test_capture_hooks_match_the_models_own_outputs():
    """Z of every block equals the (x, z) the SkipAt blocks return; the CLS row of the last block equals
    get_last_selfattention's; a plain timm ViT is hooked at block.attn."""
    torch.manual_seed(0)
    model = build_backbone('vit_tiny_patch16_skipat_224', {**KWARGS, 'skip_indices': [2, 3]}).eval()
    assert block_kinds(model) == ['attention', 'attention', 'skipped', 'skipped', 'attention', 'attention']
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad(), BlockCapture(model) as capture:
        model.forward_features(x)
        h, _ = model._embed(x)
        z = None
        for i, blk in enumerate(model.blocks):
            h, z = blk(h, z, model.patch_embed.grid_size)
            torch.testing.assert_close(capture.z_grams[i], gram(z))
        last = get_last_selfattention(model, x)[:, :, 0]
        torch.testing.assert_close(capture.attn_grams[5][1], gram(last[:, 1]))
        torch.testing.assert_close(capture.attn_grams[5][2], gram(last.mean(1)))
    assert sorted(capture.attn_grams) == [0, 1, 4, 5]
    assert not model.blocks[0].attn._forward_hooks  # hooks removed on exit

    plain = timm.create_model('vit_tiny_patch16_224', num_classes=0, **KWARGS).eval()
    with torch.no_grad(), BlockCapture(plain) as capture:
        plain.forward_features(x)
    assert sorted(capture.z_grams) == list(range(6)) and sorted(capture.attn_grams) == list(range(6))


def plant_redundancy(model, block: int, eps: float = 1e-4) -> None:
    """Make block ``block + 1``'s MSA output equal block ``block``'s, up to a 1e-4 relative perturbation: block
    ``block`` adds almost nothing to the residual stream (its attention output scaled by eps, which CKA ignores,
    its MLP zeroed), and block ``block + 1`` gets a copy of its norm1 and attention."""
    a, b = model.blocks[block], model.blocks[block + 1]
    with torch.no_grad():
        a.attn.proj.weight.mul_(eps)
        a.attn.proj.bias.mul_(eps)
        a.mlp.fc2.weight.zero_()
        a.mlp.fc2.bias.zero_()
        b.norm1.load_state_dict(a.norm1.state_dict())
        b.attn.load_state_dict(a.attn.state_dict())


def neighbour_cka(plant: bool) -> np.ndarray:
    """Z CKA matrix of a random-init tiny timm ViT (6 blocks), with or without block 4 made a copy of block 3."""
    torch.manual_seed(3)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=0, **KWARGS).eval()
    if plant:
        plant_redundancy(model, 3)
    torch.manual_seed(5)
    result = measure(model, [torch.randn(16, 1, 16, 16) for _ in range(4)], torch.device('cpu'))
    assert result['images'] == 64 and result['skipped_blocks'] == []
    assert np.allclose(np.diag(np.array(result['attention_mean'])), 1.0)
    return np.array(result['z'])


def test_planted_redundancy_is_found():
    """Without planting, the single best skip is another block (control); with block 4's MSA output a copy of
    block 3's, block 4 is the one skip chosen, and it is among any larger choice."""
    control = neighbour_cka(plant=False)
    assert choose_skips(control.tolist(), 1)[0] != [4]
    z = neighbour_cka(plant=True)
    assert z[4, 3] > 1 - 1e-6
    others = [z[j, j - 1] for j in range(1, 6) if j != 4]
    assert max(others) < 0.9
    assert choose_skips(z.tolist(), 1)[0] == [4]
    assert 4 in choose_skips(z.tolist(), 3)[0]


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp('cka-shards')
    write_shards(folder, 'test', [24, 21], size=16, channels=1)
    return folder


COMMON = ['--channels', '1', '--resize', '16', '--crop', '16', '--mean', '0.5', '--std', '0.25', '--num-workers', '0']


def test_command_end_to_end(shards, tmp_path, capsys):
    out = tmp_path / 'cka'
    kwargs = json.dumps({**KWARGS, 'skip_indices': [2, 3]})
    status = main(
        [
            '--checkpoint',
            'vit_tiny_patch16_skipat_224',
            '--model-kwargs',
            kwargs,
            '--shards',
            str(shards),
            '--images',
            '40',
            '--batch-size',
            '16',
            '--skips',
            '2',
            '--out',
            str(out),
            *COMMON,
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    result = json.loads((out / 'cka.json').read_text())
    assert result['images'] == 40 and result['batches'] == 3  # 16 + 16 + 8
    assert result['skipped_blocks'] == [2, 3] and result['attention_layers'] == [0, 1, 4, 5]
    assert np.array(result['z']).shape == (6, 6) and np.array(result['attention_mean']).shape == (4, 4)
    assert len(result['attention_heads']) == 2
    suggestion = result['suggestion']
    assert len(suggestion['skip_indices']) == 2 and 0 not in suggestion['skip_indices']
    assert f'model.kwargs.skip_indices=[{",".join(map(str, suggestion["skip_indices"]))}]' in printed
    assert suggestion['macs_without_skips'] > 0 and 'MACs per image' in printed
    for name in ('cka_z.png', 'cka_attention.png', 'cka_attention_head0.png', 'cka_attention_head1.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize(
    'extra, message',
    [
        (['--batch-size', '2'], '--batch-size 2'),
        (['--skips', '6'], '--skips 6'),
        (['--images', '3'], '--images 3'),
        (['--checkpoint', 'pixels'], 'pixels has no blocks'),
        (['--checkpoint', 'no_such_model'], 'unknown model'),
        (['--shards', '/nonexistent/shards'], '/nonexistent/shards does not exist'),
        (['--channels', '3'], '1-channel images but the evaluation reads 3-channel'),
        (['--device', 'gpu0'], '--device gpu0: not a device name'),
    ],
)
def test_bad_input_is_one_line_exit_2(shards, tmp_path, capsys, extra, message):
    argv = [
        '--checkpoint',
        'vit_tiny_patch16_224',
        '--model-kwargs',
        json.dumps(KWARGS),
        '--shards',
        str(shards),
        '--out',
        str(tmp_path / 'o'),
        *COMMON,
        *extra,
    ]  # argparse: the last occurrence of an option wins
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'o').exists()


def test_command_reads_an_export_and_planted_weights(shards, tmp_path, capsys):
    """The evaluators' model specs work here too: an exported plain timm ViT with block 4 a planted copy of
    block 3 (its data settings from the export's metadata), default --skips (half the depth: 3)."""
    from skipssl.checkpoint import save_backbone
    from skipssl_common.artefacts import ExportMeta

    torch.manual_seed(3)
    backbone = build_backbone('vit_tiny_patch16_224', KWARGS).eval()
    plant_redundancy(backbone, 3)
    export = save_backbone(
        backbone,
        tmp_path / 'run' / 'export' / 'teacher-00000001.safetensors',
        ExportMeta(
            'vit_tiny_patch16_224',
            KWARGS,
            iteration=1,
            data={'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16},
        ),
    )
    out = tmp_path / 'cka'
    assert (
        main(
            [
                '--checkpoint',
                str(export),
                '--shards',
                str(shards),
                '--batch-size',
                '15',
                '--num-workers',
                '0',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / 'cka.json').read_text())
    assert result['images'] == 45 and result['model']['kind'] == 'export'
    assert result['skipped_blocks'] == [] and result['attention_layers'] == list(range(6))
    assert result['z'][4][3] > 1 - 1e-6
    assert 4 in result['suggestion']['skip_indices'] and len(result['suggestion']['skip_indices']) == 3
    assert result['suggestion']['macs_with_skips'] != result['suggestion']['macs_without_skips']
    throughput = result['suggestion']['throughput']  # measured at the default CPU batch
    assert throughput['batch_size'] == 8 and throughput['device'] == 'cpu'
    assert throughput['img_per_s_without_skips'] > 0 and throughput['img_per_s_with_skips'] > 0
    assert len(throughput['per_repeat']['with_skips']) == 3
    printed = capsys.readouterr().out
    assert 'model.kwargs.skip_indices=[' in printed and 'img/s' in printed
    # the export lies in a run folder: heat maps and neighbour CKAs in the run's TensorBoard at its iteration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / 'run' / 'tb'), size_guidance={'images': 0, 'scalars': 0}).Reload()
    assert {'analysis/cka_z', 'analysis/cka_attention', 'analysis/cka_attention_head0'} <= set(events.Tags()['images'])
    block4 = events.Scalars('analysis/cka_z_previous_block/4')
    assert [e.step for e in block4] == [1] and block4[0].value == pytest.approx(result['z'][4][3], abs=1e-6)


def test_interleaved_rates_measure_what_each_step_costs():
    """Two steps of known duration (sleeps, so CPU load does not change them): rates and their paired ratio."""
    import time

    from skipssl.models.throughput import interleaved_rates, median_ratio

    calls = []
    steps = {
        'slow': lambda: (calls.append('slow'), time.sleep(0.04)),
        'fast': lambda: (calls.append('fast'), time.sleep(0.02)),
    }
    rates = interleaved_rates(steps, images_per_step=4, iters=2, repeats=3, device=torch.device('cpu'), warmup=1)
    assert len(rates['slow']) == len(rates['fast']) == 3
    assert all(80 < r <= 100 for r in rates['slow']) and all(150 < r <= 200 for r in rates['fast'])
    assert 0.4 < median_ratio(rates, 'slow', 'fast') < 0.55
    # warm-up once each, then the order alternates between repeats
    assert calls[:2] == ['slow', 'fast'] and calls[2:6] == ['slow'] * 2 + ['fast'] * 2
    assert calls[6:10] == ['fast'] * 2 + ['slow'] * 2
