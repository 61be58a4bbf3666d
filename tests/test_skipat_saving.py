"""bench.skipat_saving, run end to end at its smallest configuration (not timed: the JSON's structure and its
MAC counts are checked, not its rates)."""

import json
from types import SimpleNamespace

import pytest
import torch

from bench import skipat_saving as ss

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.mark.slow
def test_skipat_s_removes_the_attention_core_share_of_vit_s_macs_growing_with_the_token_count():
    """SkipAt-S/16 against ViT-S/16, counted with explicit attention: 3.5% fewer MACs at 197 tokens, 9.5% at
    577 (384 px), 12.3% at 785 (S/8 at 224 px)."""
    args = SimpleNamespace(n_local=0, local_size=96, head_out_dim=256)
    savings = {}
    for geo in ss.GRID[:3]:
        counts = ss.count_geometry(args, geo, torch.device('cpu'))
        savings[geo.tokens] = counts['mac_saving']['infer']
        assert counts['gmacs_per_image']['infer']['vit'] > counts['gmacs_per_image']['infer']['skipat']
    assert savings[197] == pytest.approx(0.035, abs=0.001)
    assert savings[577] == pytest.approx(0.095, abs=0.001)
    assert savings[785] == pytest.approx(0.123, abs=0.001)


@pytest.mark.slow
def test_quick_grid_runs_end_to_end_and_writes_a_consistent_report(tmp_path):
    out = tmp_path / 'saving.json'
    report = ss.main(['--quick', '--dtypes', 'fp32', '--device', 'cpu', '--out', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report['benchmark'] == 'skipat_saving' and report['device'] and report['threads'] >= 1
    assert len(report['load_average_start']) == 3 and len(report['load_average_end']) == 3
    (geo,) = report['geometries']
    assert geo['tokens'] == 17 and set(geo['gmacs_per_image']) == {'infer', 'dino_step'}
    cells = report['results']
    assert {(c['mode'], c['attention']) for c in cells} == {
        (m, a) for m in ('infer', 'dino_step') for a in ('fused', 'explicit')
    }
    for c in cells:
        counts = geo['gmacs_per_image'][c['mode']]
        assert c['gmacs_per_image'] == counts and c['mac_saving'] == pytest.approx(1 - counts['skipat'] / counts['vit'])
        assert c['ratio_skipat_over_vit'] > 0 and len(c['per_repeat_img_per_s']['vit']) == 1
        vit, skipat = c['time_share']['vit'], c['time_share']['skipat']
        assert vit['phi'] == 0 and skipat['phi'] > 0 and vit['attention'] > 0 and skipat['mlp'] > 0
        for share in (vit, skipat):
            assert 0 < share['attention'] + share['phi'] + share['mlp'] < 1
            assert share['rest'] == pytest.approx(1 - share['attention'] - share['phi'] - share['mlp'])
    # the DINO step counts student forward + backward over every crop and the teacher on the globals
    step, infer = geo['gmacs_per_image']['dino_step'], geo['gmacs_per_image']['infer']
    assert step['vit'] > 8 * infer['vit']
