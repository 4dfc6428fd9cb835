"""The distillation adjunct's client side (see ``docs/distill.md``).

Knowledge distillation runs on onnxruntime's training API, which lives in its own
environment (``onnxopt train-env``) and is driven as a worker process. Public API::

    from onnxopt.train import distill
    result = distill("teacher.onnx", "student.onnx", "data.npz", labels="label", epochs=20)
    result.save("student_trained.onnx")
"""

from __future__ import annotations

from onnxopt.train.api import DistillOptions, DistillResult, distill
from onnxopt.train.client import TrainingError
from onnxopt.train.env import TrainEnvError, create_env, default_env_dir, find_python

__all__ = [
    "DistillOptions",
    "DistillResult",
    "TrainEnvError",
    "TrainingError",
    "create_env",
    "default_env_dir",
    "distill",
    "find_python",
]
