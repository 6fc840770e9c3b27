"""Shards read over HTTP, from S3 (moto's server) and through ``pipe:`` exactly as from disk: the
same batches, a connection cut mid-shard resumed at its byte, the URL named after the last retry,
missing and altered objects named, and a resume on another world size that replays its order
without downloading what it already trained on."""

import json
import logging
import re
import shutil
from dataclasses import replace

import pytest

from conftest import small_shards
from pipeline.data.loader import LoaderSettings, StreamingLoader, merge_loader_states
from pipeline.data.shard_files import LoaderError, ReadSettings, check_shards
from shard_servers import http_server, s3_server
from test_loader import step_keys, take
from test_loader import tiny_processor as processor

pytestmark = pytest.mark.integration

STREAMS = 4          # virtual streams: each owns 4 of the 16 image shards in an epoch
PATIENT = dict(retries=3, backoff_s=0.01, timeout_s=20)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """64 images in 16 shards of 4, and 8 videos in 2."""
    return small_shards(tmp_path_factory.mktemp("remote_data"), seed=5, videos=8, images=64, multi_images=0)


@pytest.fixture(scope="module")
def http(manifest):
    with http_server(manifest.parent) as (url, faults):
        yield url, faults


@pytest.fixture
def faults(http):
    _, found = http
    found.cuts.clear(), found.stalls.clear(), found.replace.clear(), found.requests.clear()
    return found


def shard_paths(manifest, modality=None) -> list[str]:
    return [s["path"] for s in json.loads(manifest.read_text())["shards"] if modality in (None, s["modality"])]


def settings(root: str | None = None, workers: int = 0, **read) -> LoaderSettings:
    return LoaderSettings(micro_batch_size=2, shuffle_buffer=4, num_workers=workers, seed=3,
                          weights={"video": 1.0, "image": 1.0}, read=ReadSettings(root=root, **{**PATIENT, **read}))


@pytest.mark.parametrize("form, workers", [("http", 2), ("pipe", 0)])
def test_remote_shards_give_the_local_batches(manifest, http, faults, form, workers):
    url, _ = http
    root = url if form == "http" else f"pipe:cat {manifest.parent}/{{path}}"
    local = take(StreamingLoader(manifest, processor(), settings(None, workers)), 10)
    assert take(StreamingLoader(manifest, processor(), settings(root, workers)), 10) == local
    if form == "http":
        assert {path for path, _, _ in faults.requests} <= set(shard_paths(manifest)) and faults.requests


def test_a_connection_cut_mid_shard_is_re_opened_at_its_byte(manifest, http, faults, caplog):
    url, _ = http
    local = take(StreamingLoader(manifest, processor(), settings()), 8)
    for path in shard_paths(manifest):
        faults.cuts[path] = (1536, 1)  # every shard's first response drops after 1536 bytes
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_io"):
        assert take(StreamingLoader(manifest, processor(), settings(url)), 8) == local
    resumed = [(path, start) for path, start, _ in faults.requests if start]
    assert resumed and all(start == 1536 for _, start in resumed)  # Range requests from the byte it stopped at
    assert re.search(r"127\.0\.0\.1:\d+/\S+\.tar: \w+: .*; re-opening at byte 1536 in 0\.0 s \(retry 1 of 3\)",
                     caplog.text)


def test_a_connection_gone_silent_counts_as_dropped_after_the_read_timeout(manifest, http, faults, caplog):
    url, _ = http
    local = take(StreamingLoader(manifest, processor(), settings()), 4)
    for path in shard_paths(manifest):
        faults.stalls[path] = (2048, 3.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_io"):
        assert take(StreamingLoader(manifest, processor(), settings(url, timeout_s=0.3)), 4) == local
    assert "TimeoutError: timed out; re-opening at byte 2048" in caplog.text


def test_a_shard_still_failing_after_the_last_retry_stops_the_run_naming_its_url(manifest, http, faults):
    url, _ = http
    for path in shard_paths(manifest):
        faults.cuts[path] = (1000, -1)  # every response drops at byte 1000: no progress after the first
    with pytest.raises(LoaderError, match=re.escape(url) + r"/\S+\.tar: reading failed at byte 1000 after 2 retries"):
        take(StreamingLoader(manifest, processor(), settings(url, retries=2)), 2)


def test_missing_and_altered_shards_are_named(manifest, http, faults, tmp_path):
    url, _ = http
    data = json.loads(manifest.read_text())
    data["shards"].append({"path": "image/missing-000000.tar", "modality": "image", "samples": 4, "bytes": 10240})
    with_missing = tmp_path / "manifest.json"
    with_missing.write_text(json.dumps(data))
    with pytest.raises(LoaderError, match=re.escape(f"{url}/image/missing-000000.tar is missing or refused (HTTP 404")):
        check_shards(with_missing, read=ReadSettings(root=url, **PATIENT))

    first = shard_paths(manifest, "image")[0]
    original = (manifest.parent / first).read_bytes()
    faults.replace[first] = original + bytes(512)  # one more tar block: another size
    with pytest.raises(LoaderError, match=re.escape(f"{url}/{first} is {len(original) + 512} bytes, the manifest "
                                                    f"says {len(original)}")):
        check_shards(manifest, read=ReadSettings(root=url, **PATIENT))
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0xFF  # same size, other bytes: only the hash tells
    faults.replace[first] = bytes(flipped)
    check_shards(manifest, read=ReadSettings(root=url, **PATIENT))  # sizes are all a check can ask a server
    only_first = {"video": 0.0, "image": 1.0}
    reading = replace(settings(url), weights=only_first, virtual_streams=1, read=ReadSettings(root=url, hashes=True))
    with pytest.raises(LoaderError, match=re.escape(f"{url}/") + r"image/\S+\.tar is corrupted \(the sha256 of its "
                                                                  r"bytes differs"):
        take(StreamingLoader(manifest, processor(), reading), 34)  # 68 samples: every image shard read


def layout(world: int, micro: int, root: str | None = None) -> LoaderSettings:
    """Images only, global batch 4: each step takes one sample of each of the 4 virtual streams."""
    return LoaderSettings(micro_batch_size=micro, accumulation=4 // (micro * world), shuffle_buffer=2, seed=7,
                          virtual_streams=STREAMS, weights={"image": 1.0}, read=ReadSettings(root=root, **PATIENT))


def run_steps(manifest, world: int, micro: int, root: str | None, steps: int, state: dict | None = None):
    """Per step, the global batch's keys read by ``world`` ranks; and their merged state at the end."""
    loaders = [StreamingLoader(manifest, processor(), layout(world, micro, root), rank, world) for rank in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
    per_rank = [step_keys(loader, steps) for loader in loaders]
    keys = [sorted(key for rank in per_rank for key in rank[step]) for step in range(steps)]
    return keys, merge_loader_states([loader.state_dict() for loader in loaders])


def test_a_resume_on_another_world_size_replays_without_downloading_what_was_trained(manifest, http, faults):
    url, _ = http
    straight, _ = run_steps(manifest, 1, 2, url, 12)
    read_straight = {path for path, _, _ in faults.requests}
    # 12 steps x 4 streams: each stream's samples 0-11 and the one its buffer of 2 holds ahead, in 4 shards of 4
    assert len(read_straight) == 16
    first, state = run_steps(manifest, 2, 1, url, 10)
    assert first == straight[:10]
    faults.requests.clear()
    resumed, _ = run_steps(manifest, 4, 1, url, 2, state)
    assert resumed == straight[10:]
    read_resuming = {path for path, _, _ in faults.requests}
    # steps 10 and 11 read each stream's samples 11 and 12 (its third and fourth shards) and the record
    # its buffer held (from those or an earlier one): its first two shards were trained on and not read again
    assert len(read_resuming) <= 2 * STREAMS and read_resuming <= read_straight, read_resuming


@pytest.fixture(scope="module")
def s3(manifest):
    with s3_server(manifest.parent, "training-data", "ppllava/shards"):
        yield "s3://training-data/ppllava/shards"


def test_s3_shards_resume_on_another_world_size_and_name_a_missing_object(manifest, s3, tmp_path):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    straight, _ = run_steps(manifest, 1, 2, None, 6)
    check_shards(manifest, read=ReadSettings(root=s3, **PATIENT))
    first, state = run_steps(manifest, 2, 1, s3, 4)
    assert first == straight[:4]
    assert run_steps(manifest, 1, 4, s3, 2, state)[0] == straight[4:]

    data = json.loads(manifest.read_text())
    data["shards"] = [{**s, "path": s["path"].replace(".tar", "-gone.tar")} if s["modality"] == "video" else s
                      for s in data["shards"]]
    copied = tmp_path / "shards"
    shutil.copytree(manifest.parent, copied)
    (copied / "manifest.json").write_text(json.dumps(data))
    gone = sorted(s["path"] for s in data["shards"] if s["modality"] == "video")
    with pytest.raises(LoaderError, match=re.escape(f"{s3}/{gone[0]} is missing or refused")):
        check_shards(copied / "manifest.json", read=ReadSettings(root=s3, **PATIENT))
    with pytest.raises(LoaderError, match=re.escape(f"{s3}/") + r"video/\S+-gone\.tar: "):
        take(StreamingLoader(copied / "manifest.json", processor(), settings(s3)), 4)
