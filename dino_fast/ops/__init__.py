"""The fused ops users call. Each picks a backend per call (dino_fast.ops.backends):

- ``dino_loss(student_output, teacher_output, center, *, ncrops, teacher_temp, ...)``
- ``ema_update_(teacher_params, student_params, momentum)``
- ``sinkhorn_knopp(teacher_output, teacher_temp, *, n_iterations=3, ...)`` (DINOv2 teacher targets)
- ``weighted_cross_entropy(student, target, weights, *, student_temp=0.1, ...)`` (DINOv2 / iBOT losses)
- ``koleo_loss(student_output, eps=1e-8)`` (plain PyTorch)
- ``available_backends(device=None)``

``dino_fast.dinov2`` wraps the DINOv2-family ops in dinov2's loss modules.
"""

from dino_fast.ops.backends import BackendUnavailableError, available_backends
from dino_fast.ops.cross_entropy import weighted_cross_entropy
from dino_fast.ops.ema import ema_update_
from dino_fast.ops.koleo import koleo_loss
from dino_fast.ops.loss import dino_loss
from dino_fast.ops.sinkhorn import sinkhorn_knopp

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "dino_loss",
    "ema_update_",
    "koleo_loss",
    "sinkhorn_knopp",
    "weighted_cross_entropy",
]
