"""DINO pretraining: ``torchrun --nproc_per_node N pretrain.py --config configs/X.yaml [key=value ...]``
(or srun, or plain ``python pretrain.py``)."""

import sys

from skipssl.train import main

if __name__ == '__main__':
    sys.exit(main())
