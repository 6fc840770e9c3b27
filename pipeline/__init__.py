"""The training pipeline around the model: recipes, the stage runner, data, training, launch.

    __main__.py     the command line: run, validate, status, launch, synth, chat
    recipe/         recipe YAML -> typed, validated sections (no torch)
    runner.py       stages in order, skipped when their inputs are unchanged; StageContext, StopFlag
    layout.py       every file and folder name in a run directory
    atomic.py       all-or-nothing files and directories, set-aside of replaced outputs, sha256
    training.py     what the sft and dpo loops share (resume, logging, checkpoints, summary)
    checkpoint.py   atomic, resumable checkpoints (DeepSpeed state + per-rank loader and RNG state)
    metrics.py      metrics.jsonl and TensorBoard
    preference.py   DPO loss and metrics
    launch.py       SLURM / torchrun job scripts; local_launch.py: processes on this node
    exit_codes.py   what every command returns
    data/           cards, sources, media, sharding, the streaming loader, templates, questions
    model/          model directories: setup, tiny model, consolidation, checks, inference

The stages themselves are in stages/; docs/architecture.md draws how the parts fit together.
"""
