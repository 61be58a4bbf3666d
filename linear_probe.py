#!/usr/bin/env python
"""DINO's linear evaluation of a checkpoint, an exported backbone or a random-init baseline.

    # on cached centre-crop features (default; seconds to minutes), a learning-rate sweep chosen on 10% of train
    python linear_probe.py --checkpoint runs/dino_fmnist_tiny --train-shards data/fmnist/train-index.json \\
        --test-shards data/fmnist/test-index.json --sweep
    # DINO's protocol: RandomResizedCrop + flip through the frozen backbone every epoch
    torchrun --nproc_per_node 8 linear_probe.py --augment --checkpoint runs/vit_s \\
        --train-shards /data/in1k/train --test-shards /data/in1k/val
"""

import sys

from skipssl_eval.commands import linear_main as main

if __name__ == '__main__':
    sys.exit(main())
