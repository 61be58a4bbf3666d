"""``pretrain(cfg)``: check everything cheap, start the process group, train; and the command line."""
import argparse
import difflib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from ..config import Config, ConfigError, load_config

log = logging.getLogger('skipssl')


def preflight(cfg: Config) -> str:
    """Checks that need files or devices but no training: device and precision, shards, epoch size, model.
    Returns the device kind. Raises ConfigError naming the key at fault."""
    from ..checkpoint import build_backbone
    from ..data import resolve_shards
    from .distributed import resolve_device
    from .trainer import samples_per_epoch
    try:
        device = resolve_device(cfg.engine.device)
    except RuntimeError as exn:
        raise ConfigError(f"engine.device: {exn}") from exn
    if device == 'cpu' and cfg.engine.precision == 'fp16':
        raise ConfigError("engine.precision: fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); use bf16 "
                          "or fp32")
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: not set (a shard folder, index json, .txt list or brace pattern)")
    try:
        resolve_shards(cfg.data.train_shards)
        samples_per_epoch(cfg)
    except (FileNotFoundError, ValueError) as exn:
        raise ConfigError(f"data.train_shards: {exn}") from exn
    try:
        build_backbone(cfg.model.name, dict(cfg.model.kwargs, drop_path_rate=cfg.model.drop_path_rate))
    except ValueError as exn:
        raise ConfigError(f"model: {exn}") from exn
    return device


def _save_config(cfg: Config, run_dir: Path) -> None:
    from ..checkpoint import atomic_write_text
    path = run_dir / 'config.yaml'
    text = cfg.to_yaml()
    if path.is_file() and path.read_text() != text:
        old = path.read_text().splitlines()
        diff = [ln for ln in difflib.unified_diff(old, text.splitlines(), lineterm='', n=0)
                if ln[:1] in '+-' and not ln.startswith(('+++', '---'))]
        kept = run_dir / f'config-{time.strftime("%Y%m%d-%H%M%S")}.yaml'
        path.rename(kept)
        log.warning("the config differs from the one this run folder was started with (kept as %s): %s",
                    kept.name, '; '.join(diff))
    atomic_write_text(text, path)


def pretrain(cfg: Config) -> Dict:
    """Train (or resume) the run in ``cfg.experiment.output_dir``; returns its summary. Collective: every
    rank calls it."""
    from .distributed import init_distributed, shutdown
    from .trainer import Trainer
    device = preflight(cfg)
    info = init_distributed(device)
    try:
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format=f'%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s')
        run_dir = Path(cfg.experiment.output_dir)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _save_config(cfg, run_dir)
            log.info("run %s on %d %s rank(s) (launcher: %s)", run_dir, info.world_size, device, info.launcher)
        return Trainer(cfg, info, run_dir).fit()
    finally:
        shutdown()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='pretrain.py', description="DINO pretraining of (SkipAt-)ViTs with DeepSpeed. Launch with torchrun, "
        "srun, or as one process; resumes from the newest checkpoint in experiment.output_dir.")
    p.add_argument('--config', help="experiment YAML (configs/*.yaml)")
    p.add_argument('--print-config', action='store_true', help="print the resolved config and exit")
    p.add_argument('overrides', nargs='*', help="dotted overrides, e.g. train.epochs=10 data.num_workers=4")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from .trainer import NonFiniteLoss
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end='')
            return 0
        summary = pretrain(cfg)
    except ConfigError as exn:
        print(f"pretrain.py: config error: {exn}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exn:
        print(f"pretrain.py: {exn}", file=sys.stderr)
        return 3
    if int(os.environ.get('RANK', '0')) == 0:
        state = 'finished' if summary['finished'] else f"stopped ({summary['stopped_by'] or 'iteration limit'})"
        print(yaml.safe_dump({'run': cfg.experiment.output_dir, 'state': state, 'iterations': summary['iterations'],
                              'device_hours': round(summary['device_hours'], 4),
                              'unit': summary['device_hours_unit']}, sort_keys=False), end='')
    return 0
