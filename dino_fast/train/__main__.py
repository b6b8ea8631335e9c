"""``python -m dino_fast.train`` and ``torchrun -m dino_fast.train``."""

import sys

from dino_fast.train import main

sys.exit(main())
