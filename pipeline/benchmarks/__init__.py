"""What eval asks: the paper's benchmarks (Tables 1-3), asked and scored as the authors do
(docs/eval.md), and this project's own question files.

    prompts.py         their prompts, answer prefixes and pooling texts; reading letters and
                       answers from generations; VideoMME's subtitles at the sampled frames
    readers.py         each benchmark's published layout (annotation JSON / parquet, videos, frame
                       folders, clip bounds) -> questions, every record checked before a model loads
    scoring.py         asking each benchmark's questions and scoring the answers into the tables
    answer_log.py      answers written as they come, so a re-run asks only the rest
    question_files.py  eval.multiple_choice / eval.open_ended: JSON lists of questions about media
"""
