"""The training pipeline: CLI, recipes, runner, checkpoints (being built, see the open issues)."""
