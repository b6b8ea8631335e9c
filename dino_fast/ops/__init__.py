"""The fused ops users call. Each picks a backend per call (dino_fast.ops.backends):

- ``dino_loss(student_output, teacher_output, center, *, ncrops, teacher_temp, ...)``
- ``ema_update_(teacher_params, student_params, momentum)``
- ``available_backends(device=None)``
"""

from dino_fast.ops.backends import BackendUnavailableError, available_backends
from dino_fast.ops.ema import ema_update_
from dino_fast.ops.loss import dino_loss

__all__ = ["BackendUnavailableError", "available_backends", "dino_loss", "ema_update_"]
