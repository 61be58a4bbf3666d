"""Evaluation of pretrained backbones: feature extraction, faiss k-NN, linear probe, reports. The folder ``eval/``
installs as ``skipssl_eval``.

- ``source``: what to evaluate (training checkpoint, exported backbone, random-init timm model, raw pixels)
- ``data``: labelled evaluation shards, checked before any expensive work
- ``distributed``: rank set-up from torchrun's environment, gathering features on rank 0
- ``features``: batched, distributed feature extraction and its on-disk cache
- ``knn``: DINO's weighted k-NN classifier on a faiss exact inner-product index
- ``linear``: DINO's linear evaluation (on cached features, or with augmentation through the frozen backbone)
- ``results``: result JSON next to the checkpoint, TensorBoard scalars in the run's ``tb/``
- ``pipeline``: what ``knn_eval.py`` and ``linear_probe.py`` run
- ``report``: ``skipssl-report RUN_DIR ...``: table and plot of accuracy against device-hours
- ``cka``, ``attention``: ``skipssl-cka`` and ``skipssl-attention``, the commands of :mod:`skipssl.analysis`
- ``synthetic``: labelled synthetic shards and features for tests and benchmarks

``skipssl_eval`` reads checkpoints and exported weights through ``skipssl.checkpoint``; it never imports the trainer.
"""
