"""Launchers: SLURM / local jobs through submitit."""
