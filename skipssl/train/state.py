"""Saving and restoring the whole training state through the checkpoint format of ``skipssl.checkpoint``.

Rank 0 writes ``model.pt`` (student fp32 master weights, teacher, DINO centre, position, model spec);
every rank writes its ``rank-XXXXX.pt`` (its optimizer partition and loss-scaler state, RNG states, data
reader position, its device clock). Loading is ``weights_only``; the only non-tensor classes DeepSpeed puts
into an optimizer state (loss scaler, ZeRO stage enum, fragment addresses) are allow-listed.
"""
import logging
import os
import random
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from skipssl_common.io import atomic_torch_save

from .. import checkpoint as ckpt
from .distributed import DistInfo, rank0_decides

log = logging.getLogger(__name__)


def _safe_globals():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def rng_state(device: torch.device) -> Dict:
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])}}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    v, internal, gauss = state['python']
    random.setstate((v, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def save(root: Path, iteration: int, info: DistInfo, model_blob: Optional[Dict], rank_blob: Dict,
         keep: int) -> Path:
    """Write checkpoint ``iteration`` under ``root`` from every rank (collective); returns its folder."""
    final = root / ckpt.checkpoint_name(iteration)
    tmp = root / f'.{ckpt.checkpoint_name(iteration)}.tmp'
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(info)
    atomic_torch_save(rank_blob, tmp / ckpt.rank_file(info.rank))
    if info.is_main:
        atomic_torch_save(model_blob, tmp / ckpt.MODEL_FILE)
    _barrier(info)
    if info.is_main:
        ckpt.finalize_checkpoint(tmp, final, {'iteration': iteration, 'world_size': info.world_size})
        for old in ckpt.prune_checkpoints(root, keep):
            log.info("removed old checkpoint %s", old)
    _barrier(info)
    return final


def find_resumable(root: Path, info: DistInfo, model: Optional[Dict] = None,
                   restart_if_none_valid: bool = False) -> Optional[Path]:
    """The newest checkpoint under ``root`` that verifies, or None for a new run; collective: rank 0 decides,
    every rank gets its answer or its refusal. A corrupt or incomplete newer checkpoint is reported and skipped;
    checkpoints that exist but none of which verifies stop the run (CheckpointError naming them) unless
    ``restart_if_none_valid``; a checkpoint of other ranks or (``model``: a model spec) another model is refused."""
    return rank0_decides(lambda: _choose_checkpoint(root, info.world_size, model, restart_if_none_valid), info)


def check_resumable(root: Path, world_size: int, model: Dict) -> Optional[Path]:
    """What ``find_resumable`` would decide for ``world_size`` ranks, made without a process group (before a job
    is submitted, say) and without moving anything; CheckpointError if the run would be refused."""
    return _choose_checkpoint(root, world_size, model, restart_if_none_valid=False)


def _choose_checkpoint(root: Path, world_size: int, model: Optional[Dict],
                       restart_if_none_valid: bool) -> Optional[Path]:
    unusable = []
    for _, folder in reversed(ckpt.list_checkpoints(root)):
        try:
            record = ckpt.verify_checkpoint(folder)
        except ckpt.CheckpointError as exn:
            log.warning("checkpoint %s is not usable, trying the one before: %s", folder, exn)
            unusable.append(folder.name)
            continue
        ckpt.check_world_size(record, folder, world_size)
        if model is not None:
            saved = ckpt.load_file(folder / ckpt.MODEL_FILE)['model']
            if saved != model:
                raise ckpt.CheckpointError(f"{folder} holds {saved}, the config asks for {model}: use a new "
                                           "experiment.output_dir")
        return folder
    if unusable and not restart_if_none_valid:
        raise ckpt.CheckpointError(
            f"{root} holds {len(unusable)} checkpoint(s) and none verifies ({', '.join(unusable)}; reasons above): "
            "not starting again from iteration 0 over them. Set train.restart_if_no_valid_checkpoint=true to "
            "start again (they are moved aside), or move them away yourself")
    if unusable:
        # moved out of the way: left in place, they would sort after the new run's checkpoints and be pruned last
        aside = root / f'unusable-{time.strftime("%Y%m%d-%H%M%S")}'
        aside.mkdir()
        for name in unusable:
            os.replace(root / name, aside / name)
        log.warning("none of the checkpoints in %s verifies (%s): starting again from iteration 0, as "
                    "train.restart_if_no_valid_checkpoint asks; they were moved to %s", root, ', '.join(unusable),
                    aside)
    return None


def load(folder: Path, info: DistInfo) -> Tuple[Dict, Dict]:
    """(model blob, this rank's blob) of a verified checkpoint folder."""
    model_blob = ckpt.load_file(folder / ckpt.MODEL_FILE)
    with torch.serialization.safe_globals(_safe_globals()):
        rank_blob = ckpt.load_file(folder / ckpt.rank_file(info.rank))
    return model_blob, rank_blob


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier(group=info.control_group)
