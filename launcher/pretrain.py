"""Pretrain BERT with DeepSpeed (thin entry point; the loop lives in trainer/train.py).

    deepspeed [--num_gpus N] launcher/pretrain.py --deepspeed ds_configs/zero2.json --config configs/demo.yaml \
        [train.max_steps=10 ...]

Also: torchrun, srun (env derived from SLURM_*), or plain `python launcher/pretrain.py ...` (one process).
"""

import sys

from trainer import malloc

if __name__ == "__main__":
    malloc.preload_tcmalloc()  # CPU hosts: restart on tcmalloc before torch loads, see trainer/malloc.py
    from trainer.train import main

    sys.exit(main())
