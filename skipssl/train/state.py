"""Saving and restoring the whole training state through the checkpoint format of ``skipssl.checkpoint``.

Rank 0 writes ``model.pt`` (student fp32 master weights, teacher, DINO centre, position, model spec, the
data reader's position) and ``optimizer.pt`` (AdamW's moments per parameter name and step counts per group,
whatever the partitioning); every rank writes its ``rank-XXXXX.pt`` (its optimizer partition and
loss-scaler state, RNG states, its device clock). The COMPLETE record names the layout the checkpoint was
written with (ranks, ZeRO stage, precision, micro-batch, accumulation, global batch, virtual data slots). A
resume with the same layout loads the rank files and is bit-exact; one on another layout (another number of
ranks, another ZeRO stage) keeps the global batch and loads the world-size-independent files. Loading is
``weights_only``; the only non-tensor classes DeepSpeed puts into an optimizer state (loss scaler, ZeRO stage
enum, fragment addresses) are allow-listed.
"""

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from skipssl_common.io import atomic_torch_save

from .. import checkpoint as ckpt
from ..config import short
from ..data.integrity import DataIdentity
from .distributed import DistInfo, rank0_decides
from .plan import accumulation_for

log = logging.getLogger(__name__)

OPTIMIZER_FILE = 'optimizer.pt'
# what, when it differs from the checkpoint's, makes a resume load the world-size-independent files
PARTITIONING = ('world_size', 'zero_stage', 'precision')


def _safe_globals():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def rng_state(device: torch.device) -> Dict:
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form: numpy's global RandomState is always an MT19937
    state = {
        'torch': torch.get_rng_state(),
        'python': random.getstate(),
        'numpy': {
            'keys': torch.from_numpy(np_state[1].astype(np.int64)),
            'pos': int(np_state[2]),
            'has_gauss': int(np_state[3]),
            'cached_gaussian': float(np_state[4]),
        },
    }
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    v, internal, gauss = state['python']
    random.setstate((v, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(
        ('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian'])
    )
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def save(
    root: Path,
    iteration: int,
    info: DistInfo,
    model_blob: Optional[Dict],
    rank_blob: Dict,
    keep: int,
    layout: Dict,
    optimizer_blob: Optional[Dict] = None,
    stream: Optional[Dict] = None,
) -> Path:
    """Write checkpoint ``iteration`` under ``root`` from every rank (collective); returns its folder.
    ``model_blob`` and ``optimizer_blob``: rank 0's; ``layout``: ``plan.layout``; ``stream``: ``stream_record``.
    A write that fails (disk full) is a CheckpointError; the checkpoints before it are untouched."""
    final = root / ckpt.checkpoint_name(iteration)
    tmp = root / f'.{ckpt.checkpoint_name(iteration)}.tmp'
    record = {'iteration': iteration, 'world_size': info.world_size, 'layout': layout, 'stream': stream}
    try:
        if info.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier(info)
        atomic_torch_save(rank_blob, tmp / ckpt.rank_file(info.rank))
        if info.is_main:
            atomic_torch_save(model_blob, tmp / ckpt.MODEL_FILE)
            atomic_torch_save(optimizer_blob, tmp / OPTIMIZER_FILE)
        _barrier(info)
        if info.is_main:
            ckpt.finalize_checkpoint(tmp, final, record)
    except OSError as exn:
        shutil.rmtree(tmp, ignore_errors=True)  # what was written of it: space a full disk needs back
        newest = ckpt.list_checkpoints(root)
        kept = f'{newest[-1][1].name} is kept' if newest else 'there is no earlier checkpoint'
        raise ckpt.CheckpointError(
            f'cannot write checkpoint {final}: {exn.strerror or exn} ({type(exn).__name__}, errno {exn.errno}); '
            f'{kept}: free space and run the same command to resume'
        ) from exn
    if info.is_main:
        for old in ckpt.prune_checkpoints(root, keep):
            log.info('removed old checkpoint %s', old)
    _barrier(info)
    return final


def stream_record(seed: int, shuffle_buffer: int, iterations_per_epoch: int, data: DataIdentity) -> Dict:
    """What an epoch's stream of samples is made of, recorded with every checkpoint: a resumed reader continues
    each slot at its offset, which is only the same place in the same stream (``check_stream``)."""
    return {
        'seed': seed,
        'shuffle_buffer': shuffle_buffer,
        'iterations_per_epoch': iterations_per_epoch,
        'data': data.to_dict(),
    }


def check_stream(folder: Path, current: Dict, accept_change: bool) -> bool:
    """Whether a resume from ``folder`` must start the interrupted epoch's stream again: False when the
    checkpoint's stream (``stream_record``) is this one's; True when the data, ``experiment.seed`` or
    ``data.shuffle_buffer`` changed and ``accept_change`` (``train.resume_with_changed_data``) says to go on;
    CheckpointError naming what changed otherwise, and always when the epoch's length changed."""
    saved = json.loads((folder / ckpt.COMPLETE).read_text()).get('stream')
    if saved is None:  # written before streams were recorded: nothing to compare with
        return False
    if saved['iterations_per_epoch'] != current['iterations_per_epoch']:
        raise ckpt.CheckpointError(
            f"{folder}: the run's epochs are {saved['iterations_per_epoch']} iterations, this config makes them "
            f"{current['iterations_per_epoch']} (data.samples_per_epoch, or the shard index's count): a run keeps "
            'its epoch length; set data.samples_per_epoch to the number it started with, or use a new '
            'experiment.output_dir'
        )
    changes = [
        f'{key} {saved[name]} -> {current[name]}'
        for key, name in (('experiment.seed', 'seed'), ('data.shuffle_buffer', 'shuffle_buffer'))
        if saved[name] != current[name]
    ]
    data = DataIdentity.from_dict(current['data']).changes_from(DataIdentity.from_dict(saved['data']))
    if data:
        changes.append(f'training data changed: {data}')
    if not changes:
        return False
    what = '; '.join(changes)
    if not accept_change:
        raise ckpt.CheckpointError(
            f'{folder} was written in another stream of samples ({what}): the interrupted epoch cannot go on '
            'where it stopped. Set train.resume_with_changed_data=true to resume with its stream started again, '
            'or use a new experiment.output_dir'
        )
    log.warning(
        'resuming from %s in another stream of samples (%s), as train.resume_with_changed_data asks: the '
        "interrupted epoch's stream starts again",
        folder,
        what,
    )
    return True


def find_resumable(
    root: Path,
    info: DistInfo,
    model: Optional[Dict] = None,
    restart_if_none_valid: bool = False,
    micro_batch: Optional[int] = None,
) -> Optional[Path]:
    """The newest checkpoint under ``root`` that verifies, or None for a new run; collective: rank 0 decides,
    every rank gets its answer or its refusal. A corrupt or incomplete newer checkpoint is reported and skipped;
    checkpoints that exist but none of which verifies stop the run (CheckpointError naming them) unless
    ``restart_if_none_valid``; a checkpoint of (``model``: a model spec) another model, or one whose global batch
    ``world_size`` ranks of ``micro_batch`` images cannot keep, is refused."""
    return rank0_decides(
        lambda: _choose_checkpoint(root, info.world_size, model, restart_if_none_valid, micro_batch), info
    )


def check_resumable(root: Path, world_size: int, model: Dict, micro_batch: Optional[int] = None) -> Optional[Path]:
    """What ``find_resumable`` would decide for ``world_size`` ranks, made without a process group (before a job
    is submitted, say) and without moving anything; CheckpointError if the run would be refused."""
    return _choose_checkpoint(root, world_size, model, restart_if_none_valid=False, micro_batch=micro_batch)


def saved_layout(folder: Optional[Path]) -> Optional[Dict]:
    """The layout a verified checkpoint was written with (None: no checkpoint, or one from before layouts were
    recorded, which resumes on its own number of ranks only)."""
    if folder is None:
        return None
    return json.loads((folder / ckpt.COMPLETE).read_text()).get('layout')


def newest_layout(root: Path) -> Optional[Dict]:
    """The layout of the newest checkpoint under ``root`` that has its COMPLETE marker, unverified: a cheap look
    for start-up checks, which plan a resumed run on its layout (the resume itself verifies)."""
    for _, folder in reversed(ckpt.list_checkpoints(root)):
        try:
            return saved_layout(folder)
        except (OSError, ValueError):
            continue
    return None


def check_layout(record: Dict, folder: Path, world_size: int, micro_batch: Optional[int]) -> None:
    """A resume on ``world_size`` ranks must keep the checkpoint's global batch (CheckpointError naming the world
    sizes and micro-batches that would). A checkpoint without a layout needs the ranks that wrote it."""
    saved = record.get('layout')
    if saved is None:
        ckpt.check_world_size(record, folder, world_size)
        return
    if micro_batch is None:
        micro_batch = 1  # the job's micro-batch is not known here: only the number of ranks is checked
    try:
        accumulation_for(saved['global_batch'], micro_batch, world_size, saved.get('slots'))
    except ValueError as exn:
        raise ckpt.CheckpointError(f'{folder} (written by {saved["world_size"]} ranks): {exn}') from None


def _choose_checkpoint(
    root: Path, world_size: int, model: Optional[Dict], restart_if_none_valid: bool, micro_batch: Optional[int] = None
) -> Optional[Path]:
    unusable = []
    for _, folder in reversed(ckpt.list_checkpoints(root)):
        try:
            record = ckpt.verify_checkpoint(folder)
        except ckpt.CheckpointError as exn:
            log.warning('checkpoint %s is not usable, trying the one before: %s', folder, exn)
            unusable.append(folder.name)
            continue
        check_layout(record, folder, world_size, micro_batch)
        if model is not None:
            saved = ckpt.load_file(folder / ckpt.MODEL_FILE)['model']
            if saved != model:
                raise ckpt.CheckpointError(
                    f'{folder} holds {short(saved)}, the config asks for {short(model)}: '
                    'use a new experiment.output_dir'
                )
        return folder
    if unusable and not restart_if_none_valid:
        raise ckpt.CheckpointError(
            f'{root} holds {len(unusable)} checkpoint(s) and none verifies ({", ".join(unusable)}; reasons above): '
            'not starting again from iteration 0 over them. Set train.restart_if_no_valid_checkpoint=true to '
            'start again (they are moved aside), or move them away yourself'
        )
    if unusable:
        # moved out of the way: left in place, they would sort after the new run's checkpoints and be pruned last
        aside = root / f'unusable-{time.strftime("%Y%m%d-%H%M%S")}'
        aside.mkdir()
        for name in unusable:
            os.replace(root / name, aside / name)
        log.warning(
            'none of the checkpoints in %s verifies (%s): starting again from iteration 0, as '
            'train.restart_if_no_valid_checkpoint asks; they were moved to %s',
            root,
            ', '.join(unusable),
            aside,
        )
    return None


def relayout(saved: Optional[Dict], current: Dict) -> Dict[str, Tuple]:
    """What differs between a checkpoint's layout and this run's: key -> (saved, now)."""
    if saved is None:
        return {}
    return {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}


def load(
    folder: Path, info: DistInfo, same_world: bool, same_partitioning: bool
) -> Tuple[Dict, Optional[Dict], Optional[Dict]]:
    """(model blob, this rank's blob, optimizer blob) of a verified checkpoint folder: the rank's blob (RNG states,
    device clock, optimizer partition) when the number of ranks is the checkpoint's, the world-size-independent
    optimizer blob when the partitioning is not."""
    model_blob = ckpt.load_file(folder / ckpt.MODEL_FILE)
    rank_blob: Optional[Dict] = None
    optimizer_blob: Optional[Dict] = None
    if same_world:
        with torch.serialization.safe_globals(_safe_globals()):
            rank_blob = ckpt.load_file(folder / ckpt.rank_file(info.rank))
    if not same_partitioning:
        optimizer_blob = ckpt.load_file(folder / OPTIMIZER_FILE)
    return model_blob, rank_blob, optimizer_blob


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier(group=info.control_group)
