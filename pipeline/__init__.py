"""The training pipeline around the model: recipes, the stage runner, data, training, launch.

    __main__.py     the command line: run, validate, plan, launch, status, synth, chat, explain
    status.py       the status command; model_commands.py: chat and explain
    recipe/         recipe YAML -> typed, validated sections (no torch)
    runner.py       stages in order, skipped when their inputs are unchanged; StageContext, StopFlag
    layout.py       every file and folder name in a run directory
    atomic.py       all-or-nothing files and directories, set-aside of replaced outputs, sha256
    training/       what the sft and dpo loops share: settings, resume, TrainingRun (logging,
                    checkpoints, summary)
    checkpoint.py   atomic, resumable checkpoints (DeepSpeed state + per-rank loader and RNG state)
    metrics.py      metrics.jsonl and TensorBoard
    preference.py   DPO loss and metrics
    launch.py       SLURM / torchrun job scripts; local_launch.py: processes on this node
    exit_codes.py   what every command returns
    data/           cards, sources, media, sharding, shard files, the streaming loader, templates
    model/          model directories: setup, tiny model, consolidation, checks, inference; the
                    token budget and the memory plan
    benchmarks/     what eval asks: the paper's benchmarks the authors' way, question files
    devices.py      the devices a memory plan judges a recipe against

The stages themselves are in stages/; docs/architecture.md draws how the parts fit together.
"""
