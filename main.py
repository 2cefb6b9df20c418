"""LDM-style command line for this bundle: ``python main.py --base <config(s)> [key=value ...] -t --name <experiment>``.

Also under torchrun: ``torchrun --nproc-per-node=2 main.py --base configs/train_autoencoder.json -t --name ae``.
``python main.py --help`` lists every option with examples; the logic is in ``scripts/launch.py``.
"""

import sys

from scripts.launch import main

if __name__ == "__main__":
    sys.exit(main())
