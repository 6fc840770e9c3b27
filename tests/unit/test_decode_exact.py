"""The selective PyAV reader (only the packets the wanted frames need) returns exactly the pixels of
the sequential one (every frame in order), and the table-driven CLIP normalisation exactly those
of the float arithmetic it replaced."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.media import PyAVDecoder, read_image, read_picture, sample_indices, sample_seed
from pipeline.data.synthetic import encode_jpeg, encode_mp4
from pipeline.data.video_seek import Picture, avcc_length_size, h264_picture, packets_to_decode, sei_payload_types
from ppllava.processing import _normalize_reference, frames_to_pixels, normalize

pytestmark = pytest.mark.unit

FRAMES = 96
SEQUENTIAL = PyAVDecoder(strategy="sequential", threads=0)  # the reader as it was, FFmpeg's threads


def panning(frames: int = FRAMES, side: int = 64, seed: int = 0) -> np.ndarray:
    """A pan over a random texture with fresh grain per frame: every frame predicts from others
    and differs from them, so a wrong or missing reference shows in the pixels."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (side, side + 2 * frames, 3)).astype(np.int16)
    return np.stack([np.clip(texture[:, 2 * t: 2 * t + side] + rng.integers(-6, 7, (side, side, 1)), 0, 255)
                     for t in range(frames)]).astype(np.uint8)


@pytest.fixture(scope="module")
def gop_clip():
    """H.264 with B-frames (x264's pyramid: referenced and non-referenced B) and an IDR every 16 frames."""
    return encode_mp4(panning(), fps=24, x264_params="keyint=16:min-keyint=16:scenecut=0")


def pictures_of(data: bytes) -> list[Picture]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        size = avcc_length_size(stream.codec_context.extradata)
        return [h264_picture(packet, size, packet.pts) for packet in container.demux(stream) if packet.size]


def assert_exact(data: bytes, indices: list[int], decoder: PyAVDecoder | None = None) -> None:
    decoder = decoder or PyAVDecoder()
    assert decoder._read_selected(data, indices) is not None, "the selective path fell back"
    expected = SEQUENTIAL.read(data, indices, "clip")
    assert np.array_equal(decoder.read(data, indices, "clip"), expected)


def test_the_clip_has_what_the_planner_skips(gop_clip):
    pictures = pictures_of(gop_clip)
    assert len(pictures) == FRAMES and None not in pictures
    assert [p for p, picture in enumerate(pictures) if picture.idr] == list(range(0, FRAMES, 16))
    assert 0 < sum(not p.reference for p in pictures) < FRAMES  # non-reference B-frames
    assert [p.pts for p in pictures] != sorted(p.pts for p in pictures)  # B-frames: decoding order is not display order


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_a_32_frame_sample_reads_exactly_as_sequentially(gop_clip, training):
    indices = sample_indices(FRAMES, 32, training, sample_seed("clip/1", 3))
    feed = packets_to_decode(pictures_of(gop_clip), indices)
    assert len(feed) < FRAMES  # frames were skipped
    assert_exact(gop_clip, indices)


def test_a_training_sample_at_the_papers_geometry_reads_exactly_as_sequentially():
    """32 frames of a 10 s 30 fps 336x336 clip with x264's default GOP (what the loader reads), to
    the model's pixels: the selective read feeds far fewer packets and gives the same tensor."""
    from pipeline.data.media import read_video

    rng = np.random.default_rng(3)
    texture = rng.integers(0, 255, (336, 336 + 300, 3)).astype(np.int16)
    frames = np.stack([np.clip(texture[:, t: t + 336] + rng.integers(-10, 11, (336, 336, 1)), 0, 255)
                       for t in range(300)]).astype(np.uint8)
    data = encode_mp4(frames, fps=30)
    indices = sample_indices(300, 32, True, sample_seed("clip", 0))
    fed = packets_to_decode(pictures_of(data), indices)
    assert fed is not None and len(fed) < 240
    assert PyAVDecoder()._read_selected(data, indices) is not None, "the selective path fell back"
    new = frames_to_pixels(read_video(data, 32, True, "clip", video_decoder=PyAVDecoder()), 336)
    old = frames_to_pixels(read_video(data, 32, True, "clip", video_decoder=SEQUENTIAL), 336)
    assert new.shape == (32, 3, 336, 336) and torch.equal(new, old)


def test_frames_in_one_gop_skip_the_others(gop_clip):
    indices = [40, 41, 43, 44]
    feed = packets_to_decode(pictures_of(gop_clip), indices)
    assert feed[0] == 32 and max(feed) < 48  # from that GOP's IDR, nothing after it
    assert_exact(gop_clip, indices)


def test_repeated_unsorted_and_past_the_end_indices(gop_clip):
    assert_exact(gop_clip, [70, 5, 5, 70, 5, 33])
    assert_exact(gop_clip, [10, FRAMES - 1, FRAMES, 500])  # past the end: the last decoded frame again
    assert_exact(gop_clip, [3, 500])                       # ... the last *wanted* one, as before


def test_frame_threads_give_the_same_pixels(gop_clip):
    assert_exact(gop_clip, sample_indices(FRAMES, 32, True, 11), PyAVDecoder(threads=0))
    assert np.array_equal(PyAVDecoder("sequential", threads=1).read(gop_clip, [0, 50, 95], "c"),
                          SEQUENTIAL.read(gop_clip, [0, 50, 95], "c"))


def test_open_gops_are_planned_from_the_idr_only():
    """x264's open GOPs start with non-IDR I pictures whose leading B-frames reference the GOP
    before: nothing may be cut there, so a late frame is decoded from the first IDR on."""
    data = encode_mp4(panning(48), fps=24, x264_params="keyint=16:min-keyint=16:scenecut=0:open-gop=1")
    pictures = pictures_of(data)
    assert [p for p, picture in enumerate(pictures) if picture.idr] == [0]
    assert packets_to_decode(pictures, [40])[0] == 0
    assert_exact(data, [40, 17, 16, 15, 47])


def test_other_codecs_fall_back_to_the_sequential_read():
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for array in panning(12):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    images = [Image.fromarray(frame) for frame in panning(6)]
    gif = io.BytesIO()
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=40)
    for data in (buffer.getvalue(), gif.getvalue()):
        assert PyAVDecoder()._read_selected(data, [1, 4]) is None
        assert np.array_equal(PyAVDecoder().read(data, [4, 1], "c"), SEQUENTIAL.read(data, [4, 1], "c"))


def test_the_planner_refuses_streams_it_cannot_rank_or_start():
    idr, ref, nonref = (Picture(0, True, True), Picture(0, False, True), Picture(0, False, False))
    stream = [Picture(pts, p.idr, p.reference) for pts, p in zip([0, 3, 1, 2, 4], [idr, ref, nonref, nonref, ref])]
    assert packets_to_decode(stream, [1]) == [0, 1, 2]          # the B-frame after the P it may predict from
    assert packets_to_decode(stream, [3]) == [0, 1]             # frame 3 is the P at position 1
    assert packets_to_decode(stream[1:], [1]) is None           # no IDR first
    assert packets_to_decode([idr, Picture(0, False, True)], [1]) is None  # two frames at one pts
    assert packets_to_decode(stream, [9]) is None               # nothing wanted inside the stream


def test_state_carrying_packets_are_fed_with_their_segment():
    """A PPS or SEI in a packet otherwise skipped may change how later pictures decode."""
    stream = [Picture(0, True, True), Picture(1, False, True, state=True), Picture(2, True, True), Picture(3, False, False)]
    assert packets_to_decode(stream, [3]) == [0, 1, 2, 3]
    assert packets_to_decode([Picture(0, True, True), Picture(1, False, True), *stream[2:]], [3]) == [2, 3]


def test_nal_parsing():
    def unit(header: int, body: bytes = b"\x88\x84") -> bytes:
        return (1 + len(body)).to_bytes(4, "big") + bytes([header]) + body

    assert h264_picture(unit(0x65), 4, 7) == Picture(7, True, True)
    assert h264_picture(unit(0x01), 4, 7) == Picture(7, False, False)              # nal_ref_idc 0
    assert h264_picture(unit(0x21), 4, 7) == Picture(7, False, True)               # nal_ref_idc 1: referenced
    assert h264_picture(unit(0x09, b"\x10") + unit(0x41), 4, 7) == Picture(7, False, True)  # AUD + slice
    assert h264_picture(unit(0x68) + unit(0x41), 4, 7).state                       # a PPS
    assert not h264_picture(unit(0x06, b"\x05\x01\xaa\x80") + unit(0x41), 4, 7).state  # user data SEI
    assert h264_picture(unit(0x06, b"\x13\x01\xaa\x80") + unit(0x41), 4, 7).state  # film grain SEI
    assert h264_picture(unit(0x41) + unit(0x01), 4, 7) is None                     # slices disagree
    assert h264_picture(unit(0x74), 4, 7) is None                                  # an MVC slice
    assert h264_picture(unit(0x41)[:-1], 4, 7) is None                             # truncated
    assert sei_payload_types(b"\x05\x03\x00\x00\x03\x01\x06\x01\x00\x80") == {5, 6}  # emulation prevention
    assert avcc_length_size(b"\x00\x00\x00\x01\x67\x64\x00\x1f") is None         # Annex B


def same(tensor: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit for bit, and laid out alike (channels-last memory): the model sees the same tensor."""
    return torch.equal(tensor, expected) and tensor.stride() == expected.stride()


def test_normalisation_table_equals_the_float_arithmetic():
    every_level = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8) for _ in range(3)]
    for batch in ([every_level], images):
        expected = _normalize_reference([Image.fromarray(a) for a in batch])
        assert same(normalize(batch), expected) and same(normalize([Image.fromarray(a) for a in batch]), expected)


def old_read_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("side", [48, 20], ids=["same size", "resized"])
def test_frames_mode_pixels_equal_the_old_path(side):
    """JPEG members -> frames_to_pixels as the loader reads them now, against the old steps: a
    NumPy round trip per frame, a PIL resize (a copy at the same size), float normalisation."""
    frames = panning(4, side=48)
    members = [encode_jpeg(frame) for frame in frames]
    grey = io.BytesIO()
    Image.fromarray(frames[0, ..., 0]).save(grey, format="PNG")
    members.append(grey.getvalue())  # an L-mode image: converted to RGB in both
    old = _normalize_reference([Image.fromarray(old_read_image(m)).resize((side, side), Image.BICUBIC) for m in members])
    assert same(frames_to_pixels([read_picture(m, "f") for m in members], side), old)
    assert same(frames_to_pixels(np.stack([read_image(m, "f") for m in members]), side), old)
