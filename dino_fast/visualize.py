"""``python -m dino_fast.visualize``: self-attention maps of a DINO ViT (dino_fast.eval.attention_maps)."""

from __future__ import annotations

import sys

from dino_fast.eval.attention_maps import command

if __name__ == "__main__":
    sys.exit(command())
