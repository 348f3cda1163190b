"""Ogg Opus for the chat history's audio: a real decoder (libsndfile, through soundfile) plays
what shared/ogg.py wraps, at the length the device spoke."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from shared.audio import encode_pcm
from shared.ogg import _crc, ogg_opus, packet_samples
from tests.conftest import fixture_wav
from xiaozhi.sim import read_wav


def test_packet_durations_from_the_toc_byte():
    # config 11 (SILK WB 60 ms) one frame; config 31 (CELT FB 20 ms) two frames (code 1).
    assert packet_samples(bytes([11 << 3 | 0, 0])) == 2880
    assert packet_samples(bytes([31 << 3 | 1, 0])) == 1920
    assert packet_samples(bytes([16 << 3 | 3, 0x03])) == 3 * 120
    assert packet_samples(b"") == 0


def test_pages_are_well_formed():
    packets = encode_pcm(read_wav(fixture_wav("en_what_time.wav")), 16000, 60)
    data = ogg_opus(packets)
    offset, pages, granules = 0, 0, []
    while offset < len(data):
        assert data[offset:offset + 4] == b"OggS"
        flags, granule, _serial, sequence, crc, count = struct.unpack("<BqIIIB", data[offset + 5:offset + 27])
        size = sum(data[offset + 27:offset + 27 + count])
        page = data[offset:offset + 27 + count + size]
        assert _crc(page[:22] + b"\0\0\0\0" + page[26:]) == crc
        assert sequence == pages
        granules.append(granule)
        offset += len(page)
        pages += 1
    assert pages == len(packets) + 2 and granules == sorted(granules)
    assert granules[-1] == sum(packet_samples(p) for p in packets)


def test_a_real_decoder_plays_it():
    sf = pytest.importorskip("soundfile")
    if "OPUS" not in sf.available_subtypes("OGG"):
        pytest.skip("this libsndfile has no Opus")
    speech = read_wav(fixture_wav("en_what_time.wav"))
    data = ogg_opus(encode_pcm(speech, 16000, 60))
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate in (16000, 48000)  # libsndfile decodes at the input rate OpusHead names
    assert abs(len(audio) / rate - len(speech) / 16000) < 0.12, (len(audio) / rate, len(speech) / 16000)
    assert np.abs(audio).max() > 0.05  # speech, not silence
