"""The paper's benchmarks (Tables 1-3), asked and scored as the authors do (docs/eval.md).

    prompts.py   their prompts, answer prefixes and pooling texts; reading letters and answers
                 from generations; VideoMME's subtitles at the sampled frames
    readers.py   each benchmark's published layout (annotation JSON / parquet, videos, frame
                 folders, clip bounds) -> questions, every record checked before a model loads
"""
