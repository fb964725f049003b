"""megabatch trainer: config, models, losses, DeepSpeed engine, checkpoints, evaluation, CLI.

Only the command-line entry point (``megabatch.trainer.cli``) exists so far; the training loop
arrives with the trainer work.
"""

__version__ = "0.1.0"
