"""Frame sampling and the two video decoders, on MP4s generated here (one of them truncated)."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.media import (DecordDecoder, MediaError, PyAVDecoder, read_image, read_video, sample_indices,
                                 sample_seed)
from pipeline.data.synthetic import encode_jpeg, encode_mp4

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def counting_video():
    """40 frames whose red channel encodes the frame number (index * 6), so reads are checkable."""
    frames = np.zeros((40, 32, 32, 3), dtype=np.uint8)
    frames[..., 0] = (np.arange(40) * 6)[:, None, None]
    return encode_mp4(frames, fps=10)


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [int(round(frame[..., 0].mean() / 6)) for frame in frames]


def test_eval_sampling_takes_segment_middles():
    assert sample_indices(100, 4, training=False) == [12, 37, 62, 87]
    assert sample_indices(32, 32, training=False) == list(range(32))


def test_training_sampling_is_one_random_point_per_segment_and_seeded():
    indices = sample_indices(300, 32, training=True, seed=7)
    # Frame i spans [i, i+1): the sampled point lies in segment k, so floor(start_k) <= i < end_k.
    assert all(300 * k // 32 <= i < 300 * (k + 1) / 32 for k, i in enumerate(indices))
    assert indices == sample_indices(300, 32, training=True, seed=7)
    assert indices != sample_indices(300, 32, training=True, seed=8)
    assert sample_seed("a/1", epoch=0) != sample_seed("a/1", epoch=1) != sample_seed("a/2", epoch=1)


def test_short_videos_give_every_frame_then_repeat_the_last_in_training():
    assert sample_indices(3, 8, training=True, seed=1) == [0, 1, 2, 2, 2, 2, 2, 2]  # the authors' tail padding
    assert sample_indices(24, 32, training=True, seed=5) == list(range(24)) + [23] * 8
    assert sample_indices(3, 8, training=False) == [0, 0, 0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("decoder", [PyAVDecoder(), DecordDecoder()], ids=["pyav", "decord"])
def test_decoders_read_the_requested_frames(counting_video, decoder):
    assert decoder.frame_count(counting_video, "v") == 40
    frames = decoder.read(counting_video, [0, 5, 5, 39, 12], "v")
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == [0, 5, 5, 39, 12]


def test_pyav_and_decord_agree_on_indices_and_pixels(counting_video):
    a = read_video(counting_video, 8, training=True, key="x/1", epoch=3, video_decoder=PyAVDecoder())
    b = read_video(counting_video, 8, training=True, key="x/1", epoch=3, video_decoder=DecordDecoder())
    assert frame_numbers(a) == frame_numbers(b) == sample_indices(40, 8, True, sample_seed("x/1", 3))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2


@pytest.mark.parametrize("decoder", [PyAVDecoder(), DecordDecoder()], ids=["pyav", "decord"])
def test_truncated_and_garbage_videos_raise_media_errors(counting_video, decoder):
    with pytest.raises(MediaError, match="clip/7"):
        read_video(counting_video[: len(counting_video) // 3], 8, training=True, key="clip/7", video_decoder=decoder)
    with pytest.raises(MediaError):
        read_video(b"definitely not a video", 8, training=False, key="junk", video_decoder=decoder)


def test_images_and_truncated_images():
    picture = np.full((10, 12, 3), 200, dtype=np.uint8)
    data = encode_jpeg(picture)
    assert read_image(data, "ok").shape == (10, 12, 3)
    grey = io.BytesIO()
    Image.fromarray(picture[..., 0]).save(grey, format="PNG")
    assert read_image(grey.getvalue(), "grey").shape == (10, 12, 3)  # converted to RGB
    with pytest.raises(MediaError, match="img/3: cannot decode image"):
        read_image(data[: len(data) // 3], "img/3")


@pytest.mark.parametrize("decoder", [PyAVDecoder(), DecordDecoder()], ids=["pyav", "decord"])
def test_bounds_sample_only_that_part_of_the_video(counting_video, decoder):
    """40 frames at 10 fps; seconds 1.0-2.0 are frames 10..20, whose 4 segment middles are 11, 14, 16, 19."""
    assert decoder.frame_rate(counting_video, "v") == pytest.approx(10.0)
    frames = read_video(counting_video, 4, training=False, key="v", video_decoder=decoder, bounds=[1.0, 2.0])
    assert frame_numbers(frames) == [11, 14, 16, 19]
    trained = read_video(counting_video, 4, training=True, key="v", video_decoder=decoder, bounds=[1.0, 2.0])
    assert all(10 <= n <= 20 for n in frame_numbers(trained))
    with pytest.raises(MediaError, match="hold no frame"):
        read_video(counting_video, 4, training=False, key="v", video_decoder=decoder, bounds=[9.0, 12.0])


def test_gifs_are_read_with_pyav_whichever_decoder_is_configured():
    images = [Image.fromarray(np.full((32, 32, 3), 6 * i, np.uint8)) for i in range(10)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=40)
    frames = read_video(buffer.getvalue(), 5, training=False, key="g", video_decoder=DecordDecoder())
    assert frames.shape == (5, 32, 32, 3) and frame_numbers(frames) == [1, 3, 5, 7, 9]


def test_the_authors_frame_arithmetic_is_available_exactly():
    """Golden values from their test/video_utils.py (eval) and datasets/utils.py (training)."""
    assert sample_indices(100, 4, training=False, scheme="authors") == [12, 37, 62, 86]  # ours ends at 87
    eval32 = sample_indices(32, 32, training=False, scheme="authors")
    assert 31 not in eval32 and eval32.count(16) == 2  # the last frame ends no segment
    picks = sample_indices(300, 32, training=True, seed=3, scheme="authors")
    starts = [int(300 * k / 32) for k in range(33)]
    assert all(starts[k] <= i <= starts[k + 1] - 2 for k, i in enumerate(picks))
    assert sample_indices(15, 32, training=True, seed=3, scheme="authors") == list(range(15)) + [14] * 17
    with pytest.raises(ValueError, match="frame sampling must be one of"):
        sample_indices(10, 4, training=False, scheme="uniform")


def rotated_clip(degrees: int, width: int = 128, height: int = 64) -> bytes:
    """A clip stored width x height whose display matrix turns it by ``degrees`` (as phones tag
    portrait clips): the left quarter white, the top rows green, so the orientation is visible."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(degrees)
        for _ in range(4):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[:, : width // 4] = 255
            pixels[: height // 4, :, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_both_decoders_turn_a_rotated_clip_by_its_display_matrix(degrees):
    """A GPU node (decord) and an Ascend node (PyAV) read the same frames of a rotation-tagged clip."""
    data = rotated_clip(degrees)
    pyav, decord = (decoder.read(data, [0, 3], "r") for decoder in (PyAVDecoder(), DecordDecoder()))
    shown = (64, 128) if degrees in (0, 180) else (128, 64)
    assert pyav.shape == decord.shape == (2, *shown, 3)
    assert np.abs(pyav.astype(int) - decord.astype(int)).mean() < 2
    if degrees == 0:
        assert pyav[0, :, :24].mean() > 200  # as stored: the white quarter on the left


@pytest.mark.parametrize("degrees", [90, 270])
def test_the_selective_reader_turns_rotated_clips_like_the_sequential_one(degrees):
    data = rotated_clip(degrees)
    assert PyAVDecoder()._read_selected(data, [0, 3]) is not None  # planned, not fallen back
    assert np.array_equal(PyAVDecoder().read(data, [3, 0], "r"),
                          PyAVDecoder(strategy="sequential", threads=0).read(data, [3, 0], "r"))
