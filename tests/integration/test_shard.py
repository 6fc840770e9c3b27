"""Shard stage on synthetic data: counts, rejects with reasons, atomic tars, no-op re-run."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.data import sharding
from pipeline.data.sharding import ShardSettings, run_shard
from pipeline.data.synthetic import SynthSettings, generate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    counts = generate(root, SynthSettings(seed=2, videos=5, images=4, multi_images=3, eval_questions=0, dpo_pairs=3, broken=1))
    return root, counts


def settings(root: Path, output: Path, **overrides) -> dict:
    """run_shard's arguments for every card under root/cards."""
    cards = sorted(str(p) for p in (root / "cards").glob("*.yaml"))
    return {"cards": cards, "output": output,
            "settings": ShardSettings(**{"max_samples_per_shard": 2, "records_per_unit": 3, **overrides})}


def test_manifest_counts_rejects_and_shards(synth, tmp_path):
    root, generated = synth
    manifest = run_shard(**settings(root, tmp_path / "out"))
    rejected = {item["key"]: item["reason"] for item in manifest["rejected"]}
    assert len(rejected) == generated["broken"] == 2
    assert any("cannot decode image" in reason for reason in rejected.values())
    assert any("cannot open video" in reason for reason in rejected.values())
    assert manifest["counts"] == {"video": generated["videos"] - 1, "image": generated["images"] - 1,
                                  "multi_image": generated["multi_images"], "dpo": generated["dpo_pairs"]}
    assert manifest["records"] == sum(manifest["counts"].values()) + len(rejected)
    assert set(manifest["sources"]) == {"synthetic_video", "synthetic_image", "synthetic_multi_image", "synthetic_dpo"}
    for shard in manifest["shards"]:
        path = tmp_path / "out" / shard["path"]
        assert shard["samples"] <= 2 and path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len([n for n in names if n.endswith(".json")]) == shard["samples"]
    assert not list((tmp_path / "out").rglob("*.tmp"))
    multi = next(s for s in manifest["shards"] if s["modality"] == "multi_image")
    with tarfile.open(tmp_path / "out" / multi["path"]) as tar:
        members = tar.getnames()
        record = json.loads(tar.extractfile(next(n for n in members if n.endswith(".json"))).read())
    key = next(n for n in members if n.endswith(".json"))[: -len(".json")]
    assert f"{key}.0.jpg" in members and f"{key}.1.jpg" in members and record["modality"] == "multi_image"


def test_rerun_with_unchanged_inputs_does_nothing_and_a_change_redoes(synth, tmp_path, caplog):
    root, _ = synth
    first = run_shard(**settings(root, tmp_path / "out"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.tar")}
    with caplog.at_level("INFO"):
        again = run_shard(**settings(root, tmp_path / "out"))
    assert again == first and "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.tar")} == stamps
    changed = run_shard(**settings(root, tmp_path / "out", max_samples_per_shard=10))
    assert changed["fingerprint"] != first["fingerprint"] and all(s["samples"] <= 10 for s in changed["shards"])


def test_a_crash_leaves_no_complete_looking_tar_and_the_rerun_finishes(synth, tmp_path, monkeypatch):
    root, _ = synth
    real = sharding._checked_media
    calls = {"n": 0}

    def crash_on_fourth(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(sharding, "_checked_media", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_shard(**settings(root, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    for tar in (tmp_path / "out").rglob("*.tar"):  # every final-named tar is complete and readable
        with tarfile.open(tar) as archive:
            assert archive.getnames()
    monkeypatch.setattr(sharding, "_checked_media", real)
    reference = run_shard(**settings(root, tmp_path / "reference"))
    finished = run_shard(**settings(root, tmp_path / "out"))
    assert finished["counts"] == reference["counts"] and len(finished["rejected"]) == len(reference["rejected"])


def test_processes_and_frames_mode(synth, tmp_path):
    root, _ = synth
    serial = run_shard(**settings(root, tmp_path / "serial"))
    parallel = run_shard(**settings(root, tmp_path / "parallel", processes=2))
    assert parallel["counts"] == serial["counts"] and parallel["rejected"] == serial["rejected"]
    frames = run_shard(**settings(root, tmp_path / "frames", media="frames", num_frames=4))
    video = next(s for s in frames["shards"] if s["modality"] == "video")
    with tarfile.open(tmp_path / "frames" / video["path"]) as tar:
        names = tar.getnames()
    assert any(n.endswith(".f00003.jpg") for n in names) and not any(n.endswith(".mp4") for n in names)


def test_two_ranks_split_the_units(synth, tmp_path):
    root, _ = synth
    ranked = settings(root, tmp_path / "out")
    assert run_shard(**ranked, rank=1, world_size=2) == {}
    units_rank1 = set(p.name for p in (tmp_path / "out" / "units").glob("*.json"))
    manifest = run_shard(**ranked, rank=0, world_size=2)
    assert units_rank1 and units_rank1 < set(p.name for p in (tmp_path / "out" / "units").glob("*.json"))
    assert manifest["counts"] == run_shard(**settings(root, tmp_path / "single"))["counts"]


def test_limit_per_card_shards_the_first_records_of_each_card(synth, tmp_path):
    root, _ = synth

    def records_per_card(manifest) -> dict:
        counts = {}
        for shard in manifest["shards"]:
            counts[shard["dataset"]] = counts.get(shard["dataset"], 0) + shard["samples"]
        for item in manifest["rejected"]:
            counts[item["dataset"]] = counts.get(item["dataset"], 0) + 1
        return counts

    cards = ("synthetic_video", "synthetic_image", "synthetic_multi_image", "synthetic_dpo")
    manifest = run_shard(**settings(root, tmp_path / "out", limit_per_card=2))  # inside the first unit (3)
    assert manifest["records"] == 8 and records_per_card(manifest) == dict.fromkeys(cards, 2)
    everything = records_per_card(run_shard(**settings(root, tmp_path / "all")))
    across_units = run_shard(**settings(root, tmp_path / "units", limit_per_card=4, records_per_unit=1))
    assert records_per_card(across_units) == {card: min(4, everything[card]) for card in cards}
    assert min(everything.values()) < 4 < max(everything.values())  # the limit cuts some cards, not others


def test_frame_folders_and_gifs_become_frames_the_loader_samples(tmp_path):
    """LLaVA-Hound's frame folders ({:0>6}.jpg) and TGIF's GIFs: every frame goes into the tar as
    fNNNNN.jpg, in order; the processor samples from them as from a decoded video."""
    import io

    import numpy as np
    from PIL import Image

    from conftest import tiny_config_for, tiny_tokenizer
    from pipeline.data.collate import SampleProcessor
    from pipeline.data.loader import media_members
    from pipeline.data.shard_files import read_tar
    from pipeline.data.records import Sample
    from pipeline.data.synthetic import encode_jpeg

    media = tmp_path / "media"
    for index in range(15):  # frame n has brightness 10 n
        (media / "v_0").mkdir(parents=True, exist_ok=True)
        (media / "v_0" / f"{index + 1:0>6}.jpg").write_bytes(encode_jpeg(np.full((48, 48, 3), 10 * index, np.uint8)))
    gif = [Image.fromarray(np.full((48, 48, 3), 20 * i, np.uint8)) for i in range(6)]
    buffer = io.BytesIO()
    gif[0].save(buffer, format="GIF", save_all=True, append_images=gif[1:], duration=40)
    (media / "t.gif").write_bytes(buffer.getvalue())
    (media / "empty").mkdir()
    records = [{"video": name, "QA": [{"q": "What happens?", "a": "Things."}]} for name in ("v_0", "t.gif", "empty")]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    card = tmp_path / "card.yaml"
    card.write_text(f"name: folders\nformat: videochat2\nannotation: {tmp_path / 'qa.json'}\nmedia_root: {media}\n"
                    "modality: video\n")
    manifest = run_shard([str(card)], tmp_path / "out", ShardSettings(num_frames=8))
    assert manifest["counts"] == {"video": 2}
    assert [item["key"] for item in manifest["rejected"]] == ["folders/2"]
    assert "has no .jpg" in manifest["rejected"][0]["reason"]
    shard = next(s for s in manifest["shards"])
    samples = list(read_tar(tmp_path / "out" / shard["path"]))
    folder, animated = (media_members(s, Sample.from_json(json.loads(s["json"]))) for s in samples)
    assert len(folder) == 15 and len(animated) == 6
    tokenizer = tiny_tokenizer()
    processor = SampleProcessor(tiny_config_for(tokenizer), tokenizer, tokenizer)
    sample = Sample.from_json(json.loads(samples[0]["json"]))
    processor.settings.num_frames = 20  # more than the folder holds: all 15, then the last repeated
    pixels = processor(sample, folder).pixel_values
    brightness = [round(float(frame.mean()), 1) for frame in pixels]
    assert len(pixels) == 20 and brightness[15:] == [brightness[14]] * 5
    assert brightness[:15] == sorted(brightness[:15]) and len(set(brightness[:15])) == 15


def test_a_limited_shard_fingerprints_only_the_media_it_reads(synth, tmp_path):
    from pipeline.data.cards import load_card
    from pipeline.data.sharding import source_fingerprint

    root, _ = synth
    card = load_card(root / "cards" / "synthetic_image.yaml")
    before_all, before_two = source_fingerprint(card), source_fingerprint(card, limit=2)
    unread = sorted((root / "media" / "images").glob("*.jpg"))[-1]  # past the first two records
    original = unread.read_bytes()
    try:
        unread.write_bytes(original + b"\0")
        assert source_fingerprint(card) != before_all
        assert source_fingerprint(card, limit=2) == before_two
    finally:
        unread.write_bytes(original)


def test_videos_are_checked_with_every_decoder_training_may_use(tmp_path):
    """A JPEG saved as .mp4: PyAV reads it as a one-frame video, decord refuses it. Checked with
    the decoders a recipe with data.decoder auto trains with (PyAV and decord), the shard stage
    refuses it with decord's reason instead of leaving it to fail mid-training."""
    import numpy as np

    from pipeline.data.media import validation_decoders
    from pipeline.data.synthetic import encode_jpeg, encode_mp4

    media = tmp_path / "media"
    media.mkdir()
    (media / "photo.mp4").write_bytes(encode_jpeg(np.full((64, 64, 3), 90, np.uint8)))
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    (media / "clip.mp4").write_bytes(encode_mp4(frames, fps=10))
    records = [{"video": name, "QA": [{"q": "What happens?", "a": "Things."}]} for name in ("clip.mp4", "photo.mp4")]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    card = tmp_path / "card.yaml"
    card.write_text(f"name: clips\nformat: videochat2\nannotation: {tmp_path / 'qa.json'}\nmedia_root: {media}\n"
                    "modality: video\n")
    assert validation_decoders("auto") == ["pyav", "decord"] and validation_decoders("pyav") == ["pyav"]
    pyav_only = run_shard([str(card)], tmp_path / "pyav", ShardSettings(num_frames=8))
    assert pyav_only["counts"] == {"video": 2} and pyav_only["rejected"] == []  # what was accepted before
    both = run_shard([str(card)], tmp_path / "both", ShardSettings(num_frames=8), decoders=validation_decoders("auto"))
    assert both["counts"] == {"video": 1}
    (refused,) = both["rejected"]
    assert refused["key"] == "clips/1" and "decord: cannot open video" in refused["reason"]
