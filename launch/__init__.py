"""Launchers: SLURM / local jobs through submitit (the folder ``launch/``, installed as ``skipssl_launch``).

- ``submit``: the command line (``python -m skipssl_launch.submit pretrain|knn|linear|report|pipeline``), checks before
  anything is submitted
- ``executor``: the one submission function and its scheduler options (``--cluster slurm|local|debug``)
- ``jobs``: the callables submitit runs (pretraining, evaluation entry points)
- ``environment``: inside a job: rank, world size and torch.distributed's env:// variables
- ``preemption``: checkpoint-and-requeue on preemption and time-out signals, the requeue limit
- ``slurm_cluster``: a real one-node SLURM cluster on this machine, for tests and workstations
"""
