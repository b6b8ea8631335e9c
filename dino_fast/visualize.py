"""``python -m dino_fast.visualize``: self-attention maps of a DINO ViT (see dino_fast.eval.visualize)."""

from __future__ import annotations

from dino_fast.eval.visualize import main

if __name__ == "__main__":
    main()
