"""Live transcription over /v1/realtime with the official openai SDK (3.x realtime client).

    OAS_BASE_URL=http://127.0.0.1:8000/v1 python examples/realtime_transcribe.py [speech.wav]

The audio (a 16-bit mono WAV at 24 or 16 kHz, else a generated 16 kHz tone) is sent as a
microphone would: 100 ms chunks of raw PCM, with the server's VAD ending each turn.
Transcript text is printed as it arrives, one line per turn.
"""

from __future__ import annotations

import base64
import io
import sys
import wave

from _audio import API_KEY, BASE_URL, MODEL, audio_from_argv, tone_wav
from openai import OpenAI

CHUNK_MS = 100
TRAILING_SILENCE_MS = 1000  # lets the VAD hear the end of the last turn


def pcm_of(audio: bytes, fmt: str) -> tuple[bytes, int]:
    if fmt != "wav":
        raise SystemExit("send a .wav file (16-bit mono PCM at 24000 or 16000 Hz)")
    with wave.open(io.BytesIO(audio)) as clip:
        if clip.getnchannels() != 1 or clip.getsampwidth() != 2:
            raise SystemExit("the WAV must be 16-bit mono")
        return clip.readframes(clip.getnframes()), clip.getframerate()


def main() -> None:
    # Raw PCM is what the Realtime API takes: a WAV named on the command line, else a tone.
    audio, fmt = audio_from_argv() if len(sys.argv) > 1 else (tone_wav(), "wav")
    pcm, rate = pcm_of(audio, fmt)
    if rate not in (24000, 16000):
        raise SystemExit(f"the WAV is {rate} Hz; this example sends 24000 or 16000 Hz PCM")
    pcm += bytes(2 * rate * TRAILING_SILENCE_MS // 1000)
    client = OpenAI(base_url=BASE_URL, api_key=API_KEY)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        connection.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": rate},
                        "transcription": {"model": MODEL},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                    }
                },
            }
        )
        step = 2 * rate * CHUNK_MS // 1000
        for start in range(0, len(pcm), step):
            chunk = base64.b64encode(pcm[start : start + step]).decode()
            connection.input_audio_buffer.append(audio=chunk)
        # Answered after every append before it: then all turns' ends are known.
        connection.input_audio_buffer.clear()
        turns = finished = 0
        all_sent = False
        for event in connection:
            if event.type == "input_audio_buffer.speech_stopped":
                turns += 1
            elif event.type == "input_audio_buffer.cleared":
                all_sent = True
            elif event.type == "conversation.item.input_audio_transcription.delta":
                print(event.delta, end="", flush=True)
            elif event.type == "conversation.item.input_audio_transcription.completed":
                finished += 1
                print(f"\n[turn {finished} done]")
            elif event.type == "error":
                raise SystemExit(f"error: {event.error.message}")
            if all_sent and finished == turns:
                break
        if not turns:
            print("[no speech heard]")

if __name__ == "__main__":
    main()
