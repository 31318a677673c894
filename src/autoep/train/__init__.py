"""Training: the step, the data, the loop behind `autoep train`."""

from autoep.train.step import StepResult, train_step

__all__ = ["StepResult", "train_step"]
