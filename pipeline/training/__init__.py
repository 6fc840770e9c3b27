"""What every training stage (sft, dpo) shares; each stage keeps its own loop.

    settings.py   the recipe keys a training stage's fingerprint covers (and those free to change
                  on resume), the schedule's length, the DeepSpeed engine's and the streaming
                  loader's settings, the loss normaliser
    resume.py     where a run resumes from (--resume auto | PATH), and the checks that it may:
                  the same training, the layout it moves from, the recipe's peak learning rate
    run.py        TrainingRun: the bookkeeping around a loop (resume, the non-finite guard,
                  per-step logging, checkpoints and the requeue exit, the stage's summary)

A loop reads, top to bottom:

    training = TrainingRun(context, engine, scheduler, loader, total_steps)
    for step in range(training.start(), total_steps):
        ... forward; if not training.finite(loss, batch.keys, step): training.stand_in(batch); continue
            backward; engine.step; training.interval.add(batch) ...
        training.end_step(step + 1, step_loss, lr)   # may raise StoppedForRequeue
    return training.finish()
"""

from pipeline.training.run import TrainingRun
from pipeline.training.settings import (answer_tokens, engine_settings, loader_settings, micro_batch_normaliser,
                                        read_settings, schedule_length, stage_inputs)

__all__ = ["TrainingRun", "answer_tokens", "engine_settings", "loader_settings", "micro_batch_normaliser",
           "read_settings", "schedule_length", "stage_inputs"]
