"""Streaming loader on real shards: interleaving by weight, exact resume, corrupt media."""

import hashlib
import json
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import pytest
import webdataset

from conftest import tiny_config_for, tiny_tokenizer
from pipeline.data.collate import ProcessorSettings, SampleProcessor
from pipeline.data.loader import LoaderSettings, StreamingLoader, merge_loader_states
from pipeline.data.shard_files import LoaderError
from pipeline.data.synthetic import SynthSettings, generate
from pipeline.data.sharding import ShardSettings, run_shard

pytestmark = pytest.mark.integration


def tiny_processor():
    tokenizer = tiny_tokenizer()
    return SampleProcessor(tiny_config_for(tokenizer), tokenizer, tokenizer, ProcessorSettings(max_length=256))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root / "synth", SynthSettings(seed=4, videos=12, images=12, multi_images=8, eval_questions=0, dpo_pairs=0, size=48, frames=8))
    cards = [str(p) for p in sorted((root / "synth" / "cards").glob("*.yaml")) if "dpo" not in p.name]
    run_shard(cards, root / "shards", ShardSettings(max_samples_per_shard=3, records_per_unit=6, num_frames=8))
    return root / "shards" / "manifest.json"


def fingerprint(batch) -> tuple:
    return (tuple(batch.keys), hashlib.sha256(batch.inputs["input_ids"].numpy().tobytes()).hexdigest(),
            hashlib.sha256(batch.inputs["pixel_values"].numpy().tobytes()).hexdigest())


def take(loader, count):
    batches = []
    for batch in loader:
        batches.append(fingerprint(batch))
        if len(batches) == count:
            break
    return batches


def test_interleaved_batches_follow_the_mixture_weights(manifest):
    settings = LoaderSettings(micro_batch_size=4, weights={"video": 2.0, "image": 1.0, "multi_image": 1.0}, shuffle_buffer=8)
    loader = StreamingLoader(manifest, tiny_processor(), settings)
    counts, mixed = {"video": 0, "image": 0, "multi_image": 0}, 0
    for index, batch in enumerate(loader):
        kinds = {m for m, tokens in batch.visual_tokens.items() for _ in tokens}
        mixed += len(kinds) > 1
        for modality, tokens in batch.visual_tokens.items():
            counts[modality] += len(tokens)
        if index == 124:
            break
    total = sum(counts.values())
    assert total == 500
    assert counts["video"] / total == pytest.approx(0.5, abs=0.06)
    assert counts["image"] / total == pytest.approx(0.25, abs=0.06)
    assert mixed > 100  # modalities share micro-batches


def test_per_modality_mode_keeps_batches_pure(manifest):
    loader = StreamingLoader(manifest, tiny_processor(), LoaderSettings(micro_batch_size=3, interleave=False))
    for index, batch in enumerate(loader):
        assert len(batch.visual_tokens) == 1
        if index == 10:
            break


@pytest.mark.parametrize("interleave", [True, False])
def test_every_modality_first_cycles_the_modalities_then_draws_by_weight(manifest, interleave):
    weights = {"video": 1000.0, "image": 1.0, "multi_image": 0.01}  # by weight alone: videos, nearly always
    settings = LoaderSettings(micro_batch_size=2, weights=weights, interleave=interleave, every_modality_first=True,
                              num_workers=2)
    kinds = [sorted(m for m, tokens in batch.visual_tokens.items() for _ in tokens)
             for batch in take_batches(StreamingLoader(manifest, tiny_processor(), settings), 6)]
    first = [["image", "video"], ["multi_image", "video"]] if interleave else [["video"] * 2, ["image"] * 2, ["multi_image"] * 2]
    assert kinds[:len(first)] == first
    assert all(k == ["video", "video"] for k in kinds[len(first) + 1:])


def take_batches(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(manifest, workers):
    settings = LoaderSettings(micro_batch_size=2, shuffle_buffer=4, num_workers=workers, seed=9)
    straight = take(StreamingLoader(manifest, tiny_processor(), settings), 9)
    first = StreamingLoader(manifest, tiny_processor(), settings)
    assert take(first, 5) == straight[:5]
    state = json.loads(json.dumps(first.state_dict()))  # as it would travel through a checkpoint
    resumed = StreamingLoader(manifest, tiny_processor(), settings)
    resumed.load_state_dict(state)
    assert take(resumed, 4) == straight[5:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_with_two_ranks(manifest, tmp_path, workers):
    """Each rank's loader state restored in a fresh interpreter continues that rank's sequence."""
    script = tmp_path / "resume.py"
    script.write_text(f'''
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_loader import fingerprint, tiny_processor, take
from pipeline.data.loader import LoaderSettings, StreamingLoader
rank, mode = int(sys.argv[1]), sys.argv[2]
loader = StreamingLoader({str(manifest)!r}, tiny_processor(),
                         LoaderSettings(micro_batch_size=2, shuffle_buffer=4, num_workers={workers}), rank, 2)
if mode == "resume":
    loader.load_state_dict(json.loads(open(sys.argv[3]).read()))
    print(json.dumps(take(loader, 3)))
else:  # one uninterrupted iteration; the state is saved after its third batch
    batches = iter(loader)
    first = [fingerprint(next(batches)) for _ in range(3)]
    open(sys.argv[3], "w").write(json.dumps(loader.state_dict()))
    rest = [fingerprint(next(batches)) for _ in range(3)]
    batches.close()
    print(json.dumps(first + rest))
''')
    sequences = []
    for rank in (0, 1):
        state = tmp_path / f"state{rank}.json"
        run = lambda *args: json.loads(subprocess.run([sys.executable, str(script), str(rank), *args], check=True,
                                                      capture_output=True, text=True).stdout.splitlines()[-1])
        straight = run("straight", str(state))
        assert len(straight) == 6 and run("resume", str(state)) == straight[3:]
        sequences.append(straight)
    assert sequences[0] != sequences[1]  # each rank has batches of its own


def with_corrupt_videos(manifest, root, count: int = 3):
    """A copy of ``manifest`` in ``root`` (its tars linked) plus a video shard of ``count`` samples
    whose media cannot be decoded; returns the new manifest's path."""
    data = json.loads(manifest.read_text())
    bad_shard = root / "video" / "corrupt-000000.tar"
    bad_shard.parent.mkdir(parents=True)
    with webdataset.TarWriter(str(bad_shard)) as writer:
        for index in range(count):
            record = {"key": f"corrupt/{index}", "modality": "video", "media": ["x.mp4"], "dataset": "corrupt",
                      "turns": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "No."}]}
            writer.write({"__key__": f"{index:09d}", "json": json.dumps(record).encode(), "mp4": b"\x00not a video"})
    for shard in data["shards"]:
        (root / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        (root / shard["path"]).symlink_to(manifest.parent / shard["path"])
    data["shards"].append({"path": "video/corrupt-000000.tar", "modality": "video", "samples": count})
    (root / "manifest.json").write_text(json.dumps(data))
    return root / "manifest.json"


def test_corrupt_media_is_skipped_counted_and_bounded(manifest, tmp_path, caplog):
    with_corrupt_videos(manifest, tmp_path)
    tolerant = StreamingLoader(tmp_path / "manifest.json", tiny_processor(),
                               LoaderSettings(micro_batch_size=2, weights={"video": 1.0}, shuffle_buffer=2))
    with caplog.at_level("WARNING", logger="pipeline.data.loader"):
        take(tolerant, 12)
    assert sorted(tolerant.state_dict()["bad"]) == ["corrupt/0", "corrupt/1", "corrupt/2"]
    assert all(f"skipping corrupt/{index}: " in caplog.text for index in range(3))  # logged with the sample key
    assert sorted(tolerant.reasons) == ["corrupt/0", "corrupt/1", "corrupt/2"]  # and kept, for the stage summary
    assert all("cannot open video" in reason for reason in tolerant.reasons.values())
    strict = StreamingLoader(tmp_path / "manifest.json", tiny_processor(),
                             LoaderSettings(micro_batch_size=2, weights={"video": 1.0}, shuffle_buffer=2,
                                            max_bad_fraction=0.05, bad_fraction_grace=10))
    with pytest.raises(LoaderError, match=r"undecodable .* exceed max_bad_fraction=0.05; latest: corrupt/"):
        take(strict, 12)


def step_keys(loader, steps: int, skip: int = 0) -> list[list[str]]:
    """The keys one rank's loader hands out in each of ``steps`` optimizer steps (after ``skip``
    of them)."""
    accumulation = loader.settings.accumulation
    batches = take_batches(loader, (skip + steps) * accumulation)[skip * accumulation:]
    return [[key for batch in batches[s * accumulation:(s + 1) * accumulation] for key in batch.keys]
            for s in range(steps)]


def layout(world: int, micro: int, workers: int, global_batch: int = 8, **overrides) -> LoaderSettings:
    # 8 streams over 3 or 4 shards per modality: each stream takes every 8th sample
    return LoaderSettings(micro_batch_size=micro, accumulation=global_batch // (micro * world), shuffle_buffer=4,
                          num_workers=workers, seed=11, virtual_streams=8, **overrides)


def global_steps(manifest, world: int, settings: LoaderSettings, steps: int, state: dict | None = None) -> list:
    """Per step, the sorted keys of the whole global batch, read by ``world`` ranks."""
    per_rank = []
    for rank in range(world):
        loader = StreamingLoader(manifest, tiny_processor(), settings, rank, world)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
        per_rank.append(step_keys(loader, steps))
    return [sorted(key for keys in per_rank for key in keys[step]) for step in range(steps)]


def test_a_state_resumes_on_any_layout_but_not_mid_step_or_with_another_seed(manifest):
    """A checkpoint's loader state (taken between steps; the ranks' refused samples and counts are
    merged by the trainer) continues on another world size, micro-batch size and worker count with
    exactly the samples the uninterrupted run reads in every later step."""
    straight = global_steps(manifest, 1, layout(1, 8, 0), 6)
    first = [StreamingLoader(manifest, tiny_processor(), layout(2, 2, 0), rank, 2) for rank in range(2)]
    assert [sorted(a + b) for a, b in zip(*(step_keys(loader, 3) for loader in first))] == straight[:3]
    states = [loader.state_dict() for loader in first]
    assert [state["step"] for state in states] == [3, 3]
    merged = merge_loader_states(states)
    assert merged["used"] == 24 and merged["bad"] == []
    assert global_steps(manifest, 4, layout(4, 1, 1), 3, merged) == straight[3:]
    assert global_steps(manifest, 1, layout(1, 4, 2), 3, merged) == straight[3:]

    mid_step = StreamingLoader(manifest, tiny_processor(), layout(1, 2, 0))
    take(mid_step, 3)  # 3 micro-batches of accumulation 4: inside step 0
    with pytest.raises(LoaderError, match="mid-step"):
        mid_step.state_dict()
    other_seed = StreamingLoader(manifest, tiny_processor(), replace(layout(1, 8, 0), seed=12))
    with pytest.raises(LoaderError, match="exact resume needs the same values"):
        other_seed.load_state_dict(merged)


def test_samples_refused_on_one_layout_are_skipped_the_same_way_on_another(manifest, tmp_path):
    """A refused (undecodable) sample is remembered by key in the merged state: a run resumed on
    another layout replays past it without decoding and reads on as the uninterrupted run does."""
    corrupt = with_corrupt_videos(manifest, tmp_path, count=8)
    settings = lambda world, micro: replace(layout(world, micro, 0), max_bad_fraction=0.5)  # noqa: E731
    straight = global_steps(corrupt, 1, settings(1, 8), 6)
    first = [StreamingLoader(corrupt, tiny_processor(), settings(2, 2), rank, 2) for rank in range(2)]
    assert [sorted(a + b) for a, b in zip(*(step_keys(loader, 3) for loader in first))] == straight[:3]
    merged = merge_loader_states([loader.state_dict() for loader in first])
    assert merged["bad"] and all(key.startswith("corrupt/") for key in merged["bad"])
    assert {shard for shard, _ in merged["skipped_at"]} == {"video/corrupt-000000.tar"}  # and by place
    assert global_steps(corrupt, 4, settings(4, 1), 3, merged) == straight[3:]
    # a state saved before places were kept (keys only) replays by reading the records: the same steps
    keys_only = {key: value for key, value in merged.items() if key != "skipped_at"}
    assert global_steps(corrupt, 2, settings(2, 4), 3, keys_only) == straight[3:]
    assert not any(key.startswith("corrupt/") for keys in straight for key in keys)


@pytest.mark.parametrize("ranks, micro, workers", [(1, 8, 0), (1, 2, 2), (2, 4, 0), (2, 1, 2), (4, 2, 1), (8, 1, 0)])
def test_the_samples_of_every_step_do_not_depend_on_ranks_micro_batches_or_workers(manifest, ranks, micro, workers):
    """Global batch 8: whatever the split, step s trains on the same 8 samples (by key)."""
    reference = global_steps(manifest, 1, layout(1, 8, 0), 4)
    assert global_steps(manifest, ranks, layout(ranks, micro, workers), 4) == reference
    assert len({key for step in reference for key in step}) > 8  # the steps differ from each other


def test_card_repeats_and_the_natural_mixture(tmp_path):
    from collections import Counter

    from pipeline.data.shard_files import natural_weights, stream_sizes

    generate(tmp_path / "synth", SynthSettings(seed=5, videos=6, images=4, multi_images=0, eval_questions=0,
                                               dpo_pairs=0, size=48, frames=8))
    cards = tmp_path / "synth" / "cards"
    image_card = cards / "synthetic_image.yaml"
    image_card.write_text(image_card.read_text() + "repeat: 3\n")
    manifest = run_shard([str(cards / "synthetic_video.yaml"), str(image_card)], tmp_path / "shards",
                         ShardSettings(max_samples_per_shard=3, num_frames=8))
    path = tmp_path / "shards" / "manifest.json"
    assert manifest["repeats"] == {"synthetic_video": 1, "synthetic_image": 3}
    assert stream_sizes(path)["image"] == 3 * manifest["counts"]["image"] == 12
    assert natural_weights(path) == {"video": float(manifest["counts"]["video"]), "image": 12.0}
    # one virtual stream: its epoch is the first 12 samples (several streams split an epoch unevenly)
    loader = StreamingLoader(path, tiny_processor(), LoaderSettings(micro_batch_size=4, weights={"image": 1.0},
                                                                     shuffle_buffer=1, virtual_streams=1))
    keys = [key for batch in take_batches(loader, 3) for key in batch.keys]  # one epoch: 12 samples
    assert set(Counter(keys).values()) == {3} and len(set(keys)) == 4
