"""Audio intake: bytes or URLs -> 16 kHz mono -> <=30 s segments -> Qwen log-mel features."""

from oai_audio_server.audio.cache import CacheStats, FeatureCache
from oai_audio_server.audio.decode import SAMPLE_RATE, decode_audio
from oai_audio_server.audio.features import (
    MelFeatureExtractor,
    audio_token_count,
    length_after_cnn,
)
from oai_audio_server.audio.fetch import fetch_audio_url
from oai_audio_server.audio.intake import AudioIntake, IntakeStats
from oai_audio_server.audio.payload import decode_base64_audio, decode_data_uri
from oai_audio_server.audio.segment import MAX_SEGMENT_SAMPLES, AudioSegment, split_audio
from oai_audio_server.audio.types import AudioSegmentFeatures, PreparedAudio

__all__ = [
    "MAX_SEGMENT_SAMPLES",
    "SAMPLE_RATE",
    "AudioIntake",
    "AudioSegment",
    "AudioSegmentFeatures",
    "CacheStats",
    "FeatureCache",
    "IntakeStats",
    "MelFeatureExtractor",
    "PreparedAudio",
    "audio_token_count",
    "decode_audio",
    "decode_base64_audio",
    "decode_data_uri",
    "fetch_audio_url",
    "length_after_cnn",
    "split_audio",
]
