"""Which packets of an H.264 stream the decoder must see to output a given set of frames.

A data-loader worker wants 32 frames of a ~300-frame clip; decoding every frame up to the last
wanted one (the sequential reader) spends most of its time on frames nobody looks at. Two kinds
of frame can be left out without changing a single pixel of the frames that are decoded:

- a **non-reference picture** (every slice NAL unit has ``nal_ref_idc == 0``, H.264 7.4.1): no
  other picture predicts from it, and it does not advance ``frame_num`` or the picture order
  count's reference state, so dropping it leaves the decoder's state for every later picture as it
  was. x264's B-frames outside the pyramid's middle are such pictures: ~half of all frames.
- every picture between an **IDR** picture and the next that a wanted frame does not need: an IDR
  marks all references unused (8.2.5.1), so nothing after it in decoding order reads anything
  before it, and decoding can (re)start there. Only IDR pictures qualify: a non-IDR I picture
  starts an open GOP whose leading pictures may still reference the previous one, so it ends no
  segment here (those streams are still planned exactly, with fewer packets skipped).

Everything here works on the demuxed packets only (no decoding). It returns None whenever a
stream is not one it can plan with certainty, and the caller then decodes sequentially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

SLICE, IDR_SLICE, SEI = 1, 5, 6  # nal_unit_type (Table 7-1)
# Carry no state a later picture decodes with: access unit delimiter, filler data.
STATELESS_NALS = {9, 12}
# May change how later pictures decode (parameter sets, SEI, end of sequence/stream, SPS
# extension): the packet holding one is fed even when its own frame is not wanted.
STATE_NALS = {SEI, 7, 8, 10, 11, 13}
# SEI messages that change no decoded pixel (buffering period, picture timing, filler, user data
# registered / unregistered, recovery point): a packet with only these needs no feeding.
INERT_SEI = {0, 1, 3, 4, 5, 6}


@dataclass(frozen=True)
class Picture:
    """One packet = one coded frame: its presentation time, whether it is an IDR picture, whether
    any other picture may reference it, and whether it carries state (parameter sets, SEI) that
    later pictures may decode with."""

    pts: int
    idr: bool
    reference: bool
    state: bool = False


def avcc_length_size(extradata: bytes | None) -> int | None:
    """Bytes of each NAL unit's length prefix in an MP4/MKV H.264 stream (from its
    AVCDecoderConfigurationRecord, ISO 14496-15 5.2.4.1), or None for Annex B or no extradata."""
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    size = (extradata[4] & 3) + 1
    return size if size in (1, 2, 4) else None


def h264_picture(payload: bytes | memoryview, length_size: int, pts: int) -> Picture | None:
    """The flags of one length-prefixed packet, or None if it is not one plain coded frame (a
    length running past the packet, no slice, IDR and non-IDR slices mixed, slices disagreeing on
    being referenced, data partitioning, SVC/MVC/auxiliary or reserved NAL unit types)."""
    view = memoryview(payload)
    position, end = 0, len(view)
    kinds, references, state = set(), set(), False
    while position < end:
        if position + length_size > end:
            return None
        length = int.from_bytes(view[position:position + length_size], "big")
        position += length_size
        if length == 0 or position + length > end:
            return None
        header = view[position]
        kind = header & 0x1F
        if header & 0x80:
            return None
        if kind in (SLICE, IDR_SLICE):
            kinds.add(kind)
            references.add((header >> 5) & 3 != 0)
        elif kind == SEI:
            types = sei_payload_types(view[position + 1:position + length])
            state = state or types is None or not types <= INERT_SEI
        elif kind in STATE_NALS:
            state = True
        elif kind not in STATELESS_NALS:
            return None
        position += length
    if len(kinds) != 1 or len(references) != 1:
        return None
    idr = kinds == {IDR_SLICE}
    reference = references == {True}
    if idr and not reference:  # an IDR picture always has nal_ref_idc != 0 (7.4.1)
        return None
    return Picture(pts, idr, reference, state)


def sei_payload_types(escaped: bytes | memoryview) -> set[int] | None:
    """The payload types of one SEI NAL unit's messages (7.3.2.3), or None if it does not parse."""
    data = bytes(escaped).replace(b"\x00\x00\x03", b"\x00\x00")  # emulation prevention (7.4.1)
    types, position = set(), 0
    while position < len(data) and data[position:] != b"\x80":  # rbsp_trailing_bits end it
        values = []
        for _ in range(2):  # payloadType, then payloadSize: runs of 0xFF plus a last byte
            value = 0
            while position < len(data) and data[position] == 0xFF:
                value, position = value + 255, position + 1
            if position >= len(data):
                return None
            values.append(value + data[position])
            position += 1
        types.add(values[0])
        position += values[1]
    return types if position < len(data) else None


def presentation_ranks(pictures: Sequence[Picture]) -> list[int] | None:
    """Each packet's frame index (the rank of its pts among all the stream's), in decoding
    order; None if two packets share a pts (then the index is not defined by the timestamps)."""
    order = sorted(range(len(pictures)), key=lambda position: pictures[position].pts)
    ranks = [0] * len(pictures)
    for rank, position in enumerate(order):
        ranks[position] = rank
        if rank and pictures[order[rank - 1]].pts == pictures[position].pts:
            return None
    return ranks


def packets_to_decode(pictures: Sequence[Picture], wanted: Iterable[int]) -> list[int] | None:
    """Positions (decoding order) of the packets to feed the decoder so that it outputs the
    frames of the ``wanted`` indices (ranks of pts) each exactly as decoding the whole stream
    would, ending at the last of them in decoding order. Per IDR segment (an IDR picture up to
    the next) holding a wanted frame or a state-carrying packet before that end: its reference
    pictures from the IDR up to the last such packet, and those packets themselves. None when
    the stream does not start with an IDR picture, the pts do not rank, or nothing is wanted."""
    if not pictures or not pictures[0].idr:
        return None
    ranks = presentation_ranks(pictures)
    if ranks is None:
        return None
    position_of = {rank: position for position, rank in enumerate(ranks)}
    required = {position_of[index] for index in wanted if 0 <= index < len(pictures)}
    if not required:
        return None
    end = max(required)
    required |= {position for position in range(end) if pictures[position].state}
    segment_start = [0] * (end + 1)  # the IDR each packet's segment starts at
    for position in range(1, end + 1):
        segment_start[position] = position if pictures[position].idr else segment_start[position - 1]
    last_in_segment: dict[int, int] = {}  # references after a segment's last required packet: not needed
    for position in sorted(required):
        last_in_segment[segment_start[position]] = position
    feed = []
    for start, last in sorted(last_in_segment.items()):
        feed += [p for p in range(start, last + 1) if pictures[p].reference or p in required]
    return feed
