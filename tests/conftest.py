"""Shared fixtures."""
import os
from pathlib import Path

import pytest


def _in_ci() -> bool:
    return os.environ.get('CI', '').lower() in ('true', '1')


@pytest.fixture(scope='session')
def slurm_cluster():
    """A real one-node SLURM cluster (launch.slurm_cluster), up for the whole session.

    Yields the `Cluster` (its `.env` / `.conf`); SLURM_CONF is set in os.environ meanwhile, so sbatch, srun
    and submitit reach it. Skips without root or the SLURM packages, except in CI, where that fails.
    The cluster folder is $SKIPSSL_SLURM_DIR or launch.slurm_cluster.DEFAULT_DIR; a cluster already up
    there is reused and left running.
    """
    from launch import slurm_cluster as sc

    reason = sc.unavailable_reason()
    if reason:
        if _in_ci():
            pytest.fail(f'CI must run the SLURM tests, but: {reason}', pytrace=False)
        pytest.skip(reason)
    folder = Path(os.environ.get('SKIPSSL_SLURM_DIR', sc.DEFAULT_DIR))
    started_here = not sc.is_up(folder)
    cluster = sc.up(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('SLURM_CONF', str(cluster.conf))
        yield cluster
    if started_here:
        sc.down(folder)
