#!/usr/bin/env python
"""DINO's weighted k-NN evaluation (faiss) of a checkpoint, an exported backbone or a random-init baseline.

    python knn_eval.py --checkpoint runs/dino_fmnist_tiny --train-shards data/fmnist/train-index.json \\
        --test-shards data/fmnist/test-index.json
    torchrun --nproc_per_node 8 knn_eval.py --checkpoint runs/vit_s --all-exports \\
        --train-shards /data/in1k/train --test-shards /data/in1k/val
"""

import sys

from skipssl_eval.commands import knn_main as main

if __name__ == '__main__':
    sys.exit(main())
