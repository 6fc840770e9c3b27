"""Data: from dataset cards to model inputs.

    records.py     Sample and PreferencePair, the record kinds every source produces; RecordError
    cards.py       dataset cards (one YAML per dataset) and the media-root containment check
    sources.py     annotation readers: LLaVA conversations, VideoChat2 QA, DPO pairs JSONL
    media.py       decoding images and videos (frame sampling; PyAV or decord)
    sharding.py    cards -> validated webdataset tars + manifest.json (the shard stage's work)
    shard_io.py    where shard bytes come from: local files or URLs (http, s3, pipe:), with retries
    shard_files.py the manifest and its tars as training reads them; ShardSource; OnePass; the shard check
    record_stream.py one virtual stream's records: seeded shard order, shuffle buffer, replay on places
    loader.py      the streaming, interleaved, exactly resumable loader over the tars
    templates.py   conversations -> token ids and labels (Vicuna v1 or the tokenizer's template)
    collate.py     one sample -> model inputs (SampleProcessor); samples -> an interleaved batch
    pairs.py       DPO pairs -> chosen and rejected model inputs
    synthetic.py   synthetic videos, images, questions and pairs with something to learn
"""
