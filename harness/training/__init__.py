"""The one training loop (epochs, optimizer, schedule, AMP, checkpoints, resume) under harden and the poisoning probes."""

from harness.training.loop import (OptimizerSettings, ScheduleSettings, TrainSettings, epoch_seed, learning_rate, make_optimizer,
                                   make_scaler, optimizer_step, snapshot, train_epochs)

__all__ = ["OptimizerSettings", "ScheduleSettings", "TrainSettings", "epoch_seed", "learning_rate", "make_optimizer", "make_scaler",
           "optimizer_step", "snapshot", "train_epochs"]
