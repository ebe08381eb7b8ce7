"""The phases of a training run that `finetune.recipe` calls in order: processes, run directory,
the objective, one training step; and what they use: checkpoints, the optimizer, stop signals."""
