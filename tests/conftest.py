"""Shared fixtures."""

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    """A test that needs a SLURM cluster is also slow (the cluster starts in seconds, its jobs take tens), so the
    development loop ``-m "not slow"`` leaves out every SLURM test."""
    for item in items:
        if item.get_closest_marker('slurm') and not item.get_closest_marker('slow'):
            item.add_marker(pytest.mark.slow)


def _in_ci() -> bool:
    return os.environ.get('CI', '').lower() in ('true', '1')


def _running_cluster(nodes: int, folder: Path):
    """Bring up (or reuse) the real SLURM cluster of `nodes` nodes in `folder`, yield it with SLURM_CONF set in
    os.environ, and stop it afterwards if it was started here. Skips without root or the SLURM packages, except
    in CI, where that fails."""
    from skipssl_launch import slurm_cluster as sc

    reason = sc.unavailable_reason(nodes=nodes)
    if reason:
        if _in_ci():
            pytest.fail(f'CI must run the SLURM tests, but: {reason}', pytrace=False)
        pytest.skip(reason)
    started_here = not (sc.is_up(folder) and sc.cluster_at(folder).nodes == nodes)
    cluster = sc.up(folder, nodes=nodes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('SLURM_CONF', str(cluster.conf))
        yield cluster
    if started_here:
        sc.down(folder)


@pytest.fixture(scope='session')
def slurm_cluster():
    """A real one-node SLURM cluster (skipssl_launch.slurm_cluster), up for the whole session.

    Yields the `Cluster` (its `.env` / `.conf`); SLURM_CONF is set in os.environ meanwhile, so sbatch, srun
    and submitit reach it. Skips without root or the SLURM packages, except in CI, where that fails.
    The cluster folder is $SKIPSSL_SLURM_DIR or skipssl_launch.slurm_cluster.DEFAULT_DIR; a cluster already up
    there is reused and left running.
    """
    from skipssl_launch import slurm_cluster as sc

    yield from _running_cluster(1, Path(os.environ.get('SKIPSSL_SLURM_DIR', sc.DEFAULT_DIR)))


@pytest.fixture(scope='module')
def slurm_two_nodes():
    """A real two-node SLURM cluster (nodes n1 and n2, slurm_cluster.up(nodes=2)), up for one test module.

    As `slurm_cluster`, but in $SKIPSSL_SLURM_NODES_DIR or skipssl_launch.slurm_cluster.MULTI_NODE_DIR, on its own
    ports, so that it runs beside a one-node cluster. Module-scoped: it points SLURM_CONF at itself, so the
    module using it must not use `slurm_cluster` too.
    """
    from skipssl_launch import slurm_cluster as sc

    yield from _running_cluster(2, Path(os.environ.get('SKIPSSL_SLURM_NODES_DIR', sc.MULTI_NODE_DIR)))
