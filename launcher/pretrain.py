"""Pretrain BERT with DeepSpeed (thin entry point; the loop lives in trainer/train.py).

    deepspeed [--num_gpus N] launcher/pretrain.py --deepspeed ds_configs/zero2.json --config configs/demo.yaml \
        [train.max_steps=10 ...]

Also: torchrun, srun (env derived from SLURM_*), or plain `python launcher/pretrain.py ...` (one process).
"""

import sys

from trainer.train import main

if __name__ == "__main__":
    sys.exit(main())
