"""The prepared GPU suite: every GPU-only check and measurement in one command, within 8 minutes on one H100.

On the GPU machine (through the device tool's ``run``; the wheels come from ``bash bench/fetch_gpu_wheels.sh``
run here first, 25.6 MiB in .whl/):

    run(command="bash bench/gpu_suite_run.sh --out $OUT", carry=[".whl"], timeout_s=600)

Here, and in CI (tests/test_gpu_suite.py), every stage on the CPU with tiny sizes:

    python -m bench.gpu_suite --dry-run --out /tmp/gpu_suite

Stages, in order, each in its own process with its own time cap (bench.gpu_suite.runner), results in
``{out}/{stage}.json`` (device, status ok/failed/timeout/skipped, wall seconds, error and traceback,
measurements, the end of its log) and ``{out}/summary.json``:
  prepare       synthetic labelled ImageNet-size JPEG shards, written by the project's shard writer there
  env           (a) GPU, driver, CUDA, torch and package versions, the bf16 peak used for MFU
  trainer       (b) pretrain.py on 1 GPU, nccl: bf16 ZeRO-2 device augmentation; SIGTERM, checkpoint,
                    resume against the uninterrupted run; ZeRO-0 compiled; fp16 at ZeRO-1 (loss scaling,
                    last-layer freeze)
  backbone      (c) ViT-S/16 vs SkipAt-S/16 at 224 px, bf16, batch 256 and 1024, eager and compiled, inference
                    and training (bench.backbone_throughput)
  step          (d) the DINO step, 2x224 + 10x96, batch 64 and 128: images/s, model FLOPs, MFU
                    (bench.train_step_throughput)
  saving        (h) what SkipAt saves (bench.skipat_saving): SkipAt-S/16 vs ViT-S/16 with explicit and fused
                    attention at 197, 577 and 785 tokens, bf16, inference batch 256, the DINO step at 197 tokens
  augment       (e) BatchedMultiCrop images/s and its share of a step; decode_jpeg on CUDA vs one CPU core
  knn           (f) feature extraction; exact k-NN of 200k x 384 against 10k queries with the torch search
                    on the GPU, compared with faiss on the CPU (same predictions)
  equal_images  (g) ViT-S/16 and SkipAt-S/16 DINO on the same images: device-seconds per image, k-NN after
"""
