"""Decoding media bytes into RGB frames: which frames (sampling), and how (PyAV or decord).

Both readers take the same frame indices from :func:`sample_indices`, so switching decoder
never changes which moments of a video the model sees. Media arrive as bytes (from a tar member
or a file), are decoded in memory, and never go through a path chosen by the data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import random
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.video_seek import avcc_length_size, h264_picture, packets_to_decode


class MediaError(ValueError):
    """A media file that cannot be decoded (truncated, corrupt, empty, unsupported)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def sample_seed(key: str, epoch: int, seed: int = 0) -> int:
    """A stable per-sample, per-epoch seed (Python's hash() is salted per process; this is not)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


FRAME_SCHEMES = ("segments", "authors")


def sample_indices(total: int, count: int, training: bool, seed: int = 0, scheme: str = "segments") -> list[int]:
    """``count`` frame indices of a ``total``-frame video, split into ``count`` equal segments.

    Training: a random point inside each segment (``seed`` from :func:`sample_seed`); a video
    shorter than ``count`` gives all its frames, then its last frame repeated at the tail (the
    authors' datasets/utils.py). Eval: each segment's middle (a short video's frames repeat in
    place, as the authors' eval sampling spreads them). ``scheme="authors"`` reproduces the
    authors' arithmetic exactly (:func:`authors_indices`).
    """
    if total < 1:
        raise ValueError("a video needs at least one frame")
    if scheme not in FRAME_SCHEMES:
        raise ValueError(f"frame sampling must be one of {FRAME_SCHEMES}, got {scheme!r}")
    if scheme == "authors":
        return authors_indices(total, count, training, seed)
    if training and total < count:
        return list(range(total)) + [total - 1] * (count - total)
    edges = np.linspace(0, total, count + 1)
    if training:
        rng = np.random.default_rng(seed)
        points = edges[:-1] + rng.random(count) * (edges[1:] - edges[:-1])
    else:
        points = (edges[:-1] + edges[1:]) / 2
    return np.clip(np.floor(points).astype(int), 0, total - 1).tolist()


def authors_indices(total: int, count: int, training: bool, seed: int = 0) -> list[int]:
    """The authors' frame arithmetic, off-by-ones included. Training (their datasets/utils.py,
    'rand'): segment bounds ``int(linspace(0, total, n + 1))``, a random frame in
    ``[start, next_start - 2]`` (their range excludes each segment's last frame), a random sorted
    subset when a segment is too narrow for that, and the last frame repeated at the tail of a
    short video. Eval (their test/video_utils.py): ``int(seg / 2 + round(seg * k))`` with
    ``seg = (total - 1) / count`` (the last frame ends no segment)."""
    if not training:
        segment = (total - 1) / count
        return [int(segment / 2 + np.round(segment * k)) for k in range(count)]
    rng = random.Random(seed)
    kept = min(count, total)
    bounds = np.linspace(0, total, kept + 1).astype(int)
    try:
        indices = [rng.choice(range(int(bounds[k]), int(bounds[k + 1]) - 1)) for k in range(kept)]
    except IndexError:  # a segment of one frame: their fallback
        indices = sorted(rng.sample(range(total), kept))
    return indices + [indices[-1]] * (count - kept)


class VideoDecoder(Protocol):
    name: str

    def frame_count(self, data: bytes, key: str) -> int: ...

    def frame_rate(self, data: bytes, key: str) -> float: ...

    def read(self, data: bytes, indices: list[int], key: str) -> np.ndarray: ...


class PyAVDecoder:
    """Default decoder: PyAV (FFmpeg), everywhere torch runs.

    ``strategy="selective"`` (default) feeds FFmpeg only the packets the wanted frames need
    (pipeline/data/video_seek.py: no unwanted non-reference picture, no IDR segment without a
    wanted frame, nothing after the last) and gives the same pixels as ``"sequential"``, which
    decodes every frame up to the last wanted one; streams it cannot plan exactly (not H.264 in
    MP4/MOV, a frame count or timestamps that do not add up, edit-list discards, ...) are read
    sequentially. ``threads``: FFmpeg decoding threads; 1 (default) because a data loader runs
    one worker per core, where frame threads cost up to ~20% more CPU for the same frames
    (BENCHMARKS.md); 0 lets FFmpeg choose (frame + slice threads: faster wall time for a lone
    reader with idle cores, as in the sequential reader before).
    """

    name = "pyav"

    def __init__(self, strategy: str = "selective", threads: int = 1) -> None:
        if strategy not in ("selective", "sequential"):
            raise ValueError(f"PyAV read strategy must be selective or sequential, got {strategy!r}")
        self.strategy, self.threads = strategy, threads

    def _open(self, data: bytes, key: str):
        import av

        try:
            container = av.open(io.BytesIO(data))
        except (av.error.FFmpegError, ValueError) as error:
            raise MediaError(key, f"cannot open video: {error}") from None
        if not container.streams.video:
            container.close()
            raise MediaError(key, "no video stream")
        return container

    def _configure(self, stream) -> None:
        if self.threads == 1:
            stream.thread_type = "NONE"
        else:
            stream.thread_type = "AUTO"  # frame + slice threads inside FFmpeg
            if self.threads > 1:
                stream.thread_count = self.threads

    def frame_count(self, data: bytes, key: str) -> int:
        container = self._open(data, key)
        with container:
            stream = container.streams.video[0]
            if stream.frames > 0:
                return int(stream.frames)
            return sum(1 for _ in self._frames(container, key))  # container without a frame count

    def frame_rate(self, data: bytes, key: str) -> float:
        container = self._open(data, key)
        with container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise MediaError(key, "the video has no frame rate, so start/end bounds cannot be placed")
            return float(rate)

    def _frames(self, container, key: str):
        import av

        try:
            yield from container.decode(video=0)
        except av.error.FFmpegError as error:
            raise MediaError(key, f"decoding failed: {error}") from None

    def read(self, data: bytes, indices: list[int], key: str) -> np.ndarray:
        import av

        if self.strategy == "sequential":  # the reader as it always was
            return _assemble(self._read_sequential(data, indices, key), indices, key)
        frames = self._read_selected(data, indices)
        if frames is None:  # GIFs, other codecs, streams not planned: decoded in order
            frames = self._read_sequential(data, indices, key, av.video.reformatter.VideoReformatter())
        return _assemble(frames, indices, key)

    def _read_sequential(self, data: bytes, indices: list[int], key: str, reformatter=None) -> dict[int, np.ndarray]:
        """Every frame decoded in order up to the last wanted one; a frame's index is its place
        in the decoder's output. ``reformatter``: see :func:`displayed`."""
        wanted = set(indices)
        last_wanted = max(indices)
        frames: dict[int, np.ndarray] = {}
        container = self._open(data, key)
        with container:
            self._configure(container.streams.video[0])
            for position, frame in enumerate(self._frames(container, key)):
                if position in wanted:
                    frames[position] = displayed(frame, reformatter)
                if position >= last_wanted:
                    break
        return frames

    def _read_selected(self, data: bytes, indices: list[int]) -> dict[int, np.ndarray] | None:
        """The wanted frames from only the packets they need, or None where the stream cannot be
        planned with certainty or decodes other than planned (then the sequential read decides,
        errors included). A frame's index is the rank of its pts, which is its place in the
        sequential read's output when every packet yields one frame in pts order: checked on
        the header's frame count and on every frame decoded here."""
        import av

        try:
            container = av.open(io.BytesIO(data))
        except (av.error.FFmpegError, ValueError):
            return None
        with container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            context = stream.codec_context
            length_size = avcc_length_size(context.extradata) if context.name == "h264" else None
            if length_size is None or stream.frames <= 0:
                return None
            try:
                packets = [packet for packet in container.demux(stream) if packet.size]
            except av.error.FFmpegError:
                return None
            if len(packets) != stream.frames or any(p.pts is None or p.is_discard or p.is_corrupt for p in packets):
                return None
            pictures = [h264_picture(packet, length_size, packet.pts) for packet in packets]
            feed = None if None in pictures else packets_to_decode(pictures, indices)
            if feed is None:
                return None
            rank_of = {pts: rank for rank, pts in enumerate(sorted(packet.pts for packet in packets))}
            wanted = set(indices)
            frames: dict[int, np.ndarray] = {}
            output = []
            reformatter = av.video.reformatter.VideoReformatter()
            self._configure(stream)
            try:
                for packet in [packets[position] for position in feed] + [None]:  # None: drain the decoder
                    for frame in context.decode(packet):
                        output.append(frame.pts)
                        if rank_of.get(frame.pts) in wanted:
                            frames[rank_of[frame.pts]] = displayed(frame, reformatter)
            except av.error.FFmpegError:
                return None
        if output != sorted(packets[position].pts for position in feed):
            return None  # a frame dropped, added or out of pts order: the ranks may not be positions
        return frames


def displayed(frame, reformatter=None) -> np.ndarray:
    """A PyAV frame as RGB, turned as the stream's display matrix says (a phone clip stored
    320x136 with a 90-degree rotation is shown, and read by decord, as 136x320): FFmpeg's own
    autorotate rule (its angle is counter-clockwise, the turn undoes it). PyAV builds without
    ``VideoFrame.rotation`` (before 13) read the frame as stored. ``reformatter``: one
    ``av.video.reformatter.VideoReformatter`` shared by a read's frames, the same conversion;
    ``frame.to_ndarray(format=...)`` builds a new swscale context per frame, which cost 0.4 -
    4 ms a frame here against ~0.1 ms for the conversion itself."""
    if reformatter is None:
        pixels = frame.to_ndarray(format="rgb24")
    else:
        pixels = reformatter.reformat(frame, format="rgb24").to_ndarray()
    turn = (-int(getattr(frame, "rotation", 0) or 0)) % 360
    if turn not in (0, 90, 180, 270):
        return pixels  # a display matrix that is not a quarter turn (a skew): left as stored
    return np.ascontiguousarray(np.rot90(pixels, -turn // 90)) if turn else pixels


class DecordDecoder:
    """decord: faster random access where its wheels exist (x86-64 Linux)."""

    name = "decord"

    def _reader(self, data: bytes, key: str):
        import decord

        try:
            return decord.VideoReader(io.BytesIO(data), num_threads=1)
        except (decord.DECORDError, RuntimeError) as error:
            raise MediaError(key, f"cannot open video: {error}") from None

    def frame_count(self, data: bytes, key: str) -> int:
        return len(self._reader(data, key))

    def frame_rate(self, data: bytes, key: str) -> float:
        return float(self._reader(data, key).get_avg_fps())

    def read(self, data: bytes, indices: list[int], key: str) -> np.ndarray:
        import decord

        reader = self._reader(data, key)
        wanted = sorted({i for i in indices if i < len(reader)})
        try:
            batch = reader.get_batch(wanted).asnumpy() if wanted else np.zeros((0,))
        except (decord.DECORDError, RuntimeError) as error:
            raise MediaError(key, f"decoding failed: {error}") from None
        return _assemble(dict(zip(wanted, batch)), indices, key)


def _assemble(frames: dict[int, np.ndarray], indices: list[int], key: str) -> np.ndarray:
    """Frames in ``indices`` order; an index past the decodable end repeats the last decoded
    frame (a stream shorter than its header claims), and nothing decodable is an error."""
    if not frames:
        raise MediaError(key, "no frame could be decoded")
    last = max(frames)
    return np.stack([frames[index] if index in frames else frames[last] for index in indices])


DECODERS = {"pyav": PyAVDecoder, "decord": DecordDecoder}


def decoder(name: str = "pyav") -> VideoDecoder:
    """A decoder by name; "auto" takes decord when installed, else PyAV."""
    if name == "auto":
        name = "decord" if importlib.util.find_spec("decord") is not None else "pyav"
    if name not in DECODERS:
        raise ValueError(f"unknown video decoder {name!r}; expected auto, pyav or decord")
    if importlib.util.find_spec("av" if name == "pyav" else name) is None:
        raise ValueError(f"video decoder {name!r} is not installed (pip install {'av' if name == 'pyav' else name})")
    return DECODERS[name]()


def validation_decoders(name: str) -> list[str]:
    """The decoders a shard stage proves each video with, for a recipe whose training reads videos
    with ``data.decoder`` = ``name``: that one; for "auto", every one a node may take (decord on
    GPU nodes where its wheels exist, PyAV on aarch64 Ascend nodes), of those installed here."""
    if name == "auto":
        return ["pyav"] + (["decord"] if importlib.util.find_spec("decord") is not None else [])
    decoder(name)  # installed, or a clear error
    return [name]


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_files(folder: Path) -> list[Path]:
    """A video given as a folder of frames (ShareGPTVideo's ``{:0>6}.jpg``, MVBench's
    ``{:0>5}.jpg``): its image files in name order, which is frame order for zero-padded names."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def read_video(data: bytes, count: int, training: bool, key: str, epoch: int = 0, seed: int = 0,
               video_decoder: VideoDecoder | None = None, bounds: Sequence[float] | None = None,
               scheme: str = "segments") -> np.ndarray:
    """``count`` RGB frames [count, H, W, 3] uint8 of a video, sampled per :func:`sample_indices`;
    with ``bounds`` (start, end) in seconds, from that part of the video only (frames
    round(start x fps) .. round(end x fps), clipped to the video)."""
    video_decoder = _decoder_for(data, video_decoder)
    positions = frame_positions(data, count, training, key, epoch, seed, video_decoder, bounds, scheme)
    return video_decoder.read(data, positions, key)


def _decoder_for(data: bytes, video_decoder: VideoDecoder | None) -> VideoDecoder:
    if video_decoder is None or data[:4] == b"GIF8":  # decord cannot open GIFs (TGIF, MVBench)
        return PyAVDecoder()
    return video_decoder


def frame_positions(data: bytes, count: int, training: bool, key: str, epoch: int = 0, seed: int = 0,
                    video_decoder: VideoDecoder | None = None, bounds: Sequence[float] | None = None,
                    scheme: str = "segments") -> list[int]:
    """The indices of the frames :func:`read_video` reads (VideoMME's subtitles are those shown at them)."""
    video_decoder = _decoder_for(data, video_decoder)
    total = video_decoder.frame_count(data, key)
    if total < 1:
        raise MediaError(key, "the video has no frames")
    first, last = 0, total - 1
    if bounds is not None:
        fps = video_decoder.frame_rate(data, key)
        first, last = max(0, round(bounds[0] * fps)), min(total - 1, round(bounds[1] * fps))
        if first > last:
            raise MediaError(key, f"bounds {list(bounds)} s hold no frame of a {total}-frame video at {fps:g} fps")
    indices = sample_indices(last - first + 1, count, training, sample_seed(key, epoch, seed), scheme)
    return [first + i for i in indices]


def read_image(data: bytes, key: str) -> np.ndarray:
    """One RGB image [H, W, 3] uint8; truncated or unreadable files raise :class:`MediaError`."""
    return np.asarray(read_picture(data, key))


def read_picture(data: bytes, key: str) -> Image.Image:
    """One image decoded to an RGB PIL image (the pixels :func:`read_image` returns), for callers
    that resize it next: no round trip through an array."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise MediaError(key, f"cannot decode image: {error}") from None
