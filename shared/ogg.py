"""Opus packets in an Ogg container (RFC 7845), so that browsers and players can play them.

Used for the chat history's audio: the utterance's packets as the device sent them, with no
re-encoding. Granule positions count 48 kHz samples, worked out from each packet's TOC byte.
"""

from __future__ import annotations

import struct

# Frame duration in 48 kHz samples for each TOC configuration (RFC 6716, 3.1).
_FRAME_SAMPLES = (
    [480, 960, 1920, 2880] * 3  # SILK-only: 10, 20, 40, 60 ms (NB, MB, WB)
    + [480, 960] * 2  # hybrid: 10, 20 ms
    + [120, 240, 480, 960] * 4  # CELT-only: 2.5, 5, 10, 20 ms
)


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def _crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) ^ _CRC[((crc >> 24) ^ byte) & 0xFF]) & 0xFFFFFFFF
    return crc


def packet_samples(packet: bytes) -> int:
    """48 kHz samples one Opus packet holds (0 for an empty or malformed one)."""
    if not packet:
        return 0
    toc = packet[0]
    per_frame = _FRAME_SAMPLES[toc >> 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return 0
        frames = packet[1] & 0x3F
    return per_frame * frames


def _page(serial: int, sequence: int, granule: int, packets: list[bytes], flags: int) -> bytes:
    lacing = bytearray()
    for packet in packets:
        n = len(packet)
        lacing += bytes([255] * (n // 255) + [n % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing)) + bytes(lacing)
    body = b"".join(packets)
    crc = _crc(header + body)
    return header[:22] + struct.pack("<I", crc) + header[26:] + body


def ogg_opus(packets: list[bytes], input_rate: int = 16000, serial: int = 0x78697A68) -> bytes:
    """An Ogg Opus file of mono ``packets`` (one page per packet: simple, and fine for speech)."""
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, input_rate, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 7) + b"xiaozhi" + struct.pack("<I", 0)
    out = [_page(serial, 0, 0, [head], 0x02), _page(serial, 1, 0, [tags], 0)]
    granule = 0
    packets = [p for p in packets if p and len(p) < 255 * 255]
    for index, packet in enumerate(packets):
        granule += packet_samples(packet)
        last = index == len(packets) - 1
        out.append(_page(serial, index + 2, granule, [packet], 0x04 if last else 0))
    return b"".join(out)
