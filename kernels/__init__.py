"""Triton kernels for DINO-style SSL training, installed as ``dino_fast.kernels``.

This package imports nothing from dino_fast: copy the folder into another codebase and it
works with torch and triton alone. On a machine without CUDA the kernels run under the
Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``) before these modules
are imported.
"""
