"""skipssl_common.artefacts: the run summary and the export metadata round-trip, refuse what they are not, and read
the files written before they carried a format name."""

import json

import pytest

from skipssl_common.artefacts import BACKBONE_FORMAT, SUMMARY_FORMAT, ArtefactError, ExportMeta, RunSummary

DATA = {'channels': 1, 'mean': [0.5], 'std': [0.25], 'eval_resize': 16, 'eval_crop': 16}


def test_run_summary_round_trips_through_its_file(tmp_path):
    s = RunSummary(
        'run',
        {'name': 'vit_tiny_patch16_skipat_224', 'kwargs': {'depth': 2}},
        True,
        'cpu_tiny',
        iterations=16,
        device_hours=0.01,
        device_hours_unit='core-hours',
        finished=True,
        per_epoch=[{'epoch': 0, 'iteration': 8}],
    )
    path = s.write(tmp_path)
    assert json.loads(path.read_text())['format'] == SUMMARY_FORMAT
    assert RunSummary.read(tmp_path) == s and RunSummary.from_dict(s.to_dict()) == s


def test_run_summary_refuses_what_it_is_not_and_reads_older_files(tmp_path):
    old = {
        'run_name': 'r',
        'model': {'name': 'm', 'kwargs': {}},
        'skipat': False,
        'config_name': 'c',
        'iterations': 3,
        'a_later_field': 1,
    }  # no format name: written before it was recorded
    assert RunSummary.from_dict(old).iterations == 3
    with pytest.raises(ArtefactError, match=r"summary.json lacks \['skipat', 'config_name'\]"):
        RunSummary.from_dict({'run_name': 'r', 'model': {}})
    with pytest.raises(ArtefactError, match="format 'skipssl-run-summary/2', expected 'skipssl-run-summary/1'"):
        RunSummary.from_dict({**old, 'format': 'skipssl-run-summary/2'})
    (tmp_path / 'summary.json').write_text('{"run_name": ')
    with pytest.raises(ArtefactError, match='summary.json is unreadable'):
        RunSummary.read(tmp_path)


def test_export_meta_round_trips_through_string_metadata():
    meta = ExportMeta(
        'vit_tiny_patch16_224',
        {'depth': 2, 'img_size': 16},
        iteration=8,
        epoch=1,
        images_seen=256,
        device_hours=0.5,
        device_hours_unit='core-hours',
        run_dir='/runs/a',
        data=DATA,
    )
    flat = meta.to_metadata()
    assert all(isinstance(v, str) for v in flat.values())
    assert flat['format'] == BACKBONE_FORMAT and flat['model_name'] == 'vit_tiny_patch16_224'
    assert flat['channels'] == '1' and 'data' not in flat  # the data settings sit at the top level
    assert ExportMeta.from_metadata(flat, 'x') == meta
    assert 'iteration' not in ExportMeta('m', {}).to_metadata()  # unknown: left out, not 'null'


def test_export_meta_reads_the_earlier_writers_metadata_and_refuses_other_files():
    earlier = {
        'format': BACKBONE_FORMAT,
        'model_name': 'm',
        'model_kwargs': '{"depth": 2}',
        'iteration': '5',
        'run_dir': '/runs/a',
        'channels': '1',
        'mean': '[0.5]',
    }
    meta = ExportMeta.from_metadata(earlier, 'x')
    assert (meta.model_kwargs, meta.iteration, meta.run_dir, meta.data) == (
        {'depth': 2},
        5,
        '/runs/a',
        {'channels': 1, 'mean': [0.5]},
    )
    with pytest.raises(ArtefactError, match='t.safetensors is not a skipssl backbone export'):
        ExportMeta.from_metadata({'format': 'pt'}, 't.safetensors')
    with pytest.raises(ArtefactError, match=r"lacks \['model_kwargs'\]"):
        ExportMeta.from_metadata({'format': BACKBONE_FORMAT, 'model_name': 'm'}, 't.safetensors')
