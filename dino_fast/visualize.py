"""``python -m dino_fast.visualize``: self-attention maps of a DINO ViT (dino_fast.eval.attention_maps)."""

from __future__ import annotations

import sys

from dino_fast.errors import run_command
from dino_fast.eval.attention_maps import main

if __name__ == "__main__":
    sys.exit(run_command(main))
