"""Server settings: one frozen object, filled from CLI flags and ``OAS_*`` variables.

Every field declares its flag help, its ``--help`` group and the unit of its value here,
so ``--help``, the environment variables and the README's settings table all come from
one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "OAS_"
MIB = 1024 * 1024
DEFAULT_MODEL = "Qwen/Qwen-Audio-Chat"
HUBS = ("auto", "huggingface", "modelscope")

# --help groups, in the order they are shown.
GROUPS = {
    "model": "model: what to serve and where it comes from",
    "server": "server: where it listens and how it logs",
    "limits": "limits: what one request may ask for",
    "engine": "engine: device, batching and streaming",
    "security": "security: API key, browsers and media the server may fetch",
}


def _setting(default: Any, help: str, group: str, unit: str = "", **extra: Any) -> Any:
    """``unit`` is ``bytes``, ``s`` or ``ms``: --help shows the default readably."""
    return field(default=default, metadata={"help": help, "group": group, "unit": unit, **extra})


@dataclass(frozen=True)
class Settings:
    # model
    model: str = _setting(
        DEFAULT_MODEL,
        "Checkpoint directory, or a model id on the hub (Qwen/Qwen-Audio-Chat, "
        "Qwen/Qwen2-Audio-7B-Instruct, ...).",
        "model",
    )
    hub: str = _setting(
        "auto",
        "Where a model id is downloaded from: huggingface, modelscope, or auto "
        "(Hugging Face, except ids owned by lowercase 'qwen/' or when Hugging Face cannot "
        "be reached and ModelScope can).",
        "model",
        choices=HUBS,
    )
    served_model_name: str | None = _setting(
        None,
        "Model name clients send and /v1/models lists (default: MODEL as given); "
        "comma-separate several to accept aliases.",
        "model",
        metavar="NAMES",
    )
    download_dir: str | None = _setting(
        None, "Where hub downloads go (default: the hub's own cache).", "model",
        metavar="DIR",
    )
    # server
    host: str = _setting("127.0.0.1", "Address to listen on.", "server", metavar="ADDRESS")
    port: int = _setting(8000, "Port to listen on.", "server")
    shutdown_timeout: float = _setting(
        30.0,
        "Seconds in-flight requests may finish after SIGTERM; then unfinished streams end "
        "with an error event and [DONE], other requests with a 503, and the server exits.",
        "server",
        "s",
    )
    log_json: bool = _setting(
        False, "Write logs as JSON lines (request lines carry their fields as keys).", "server"
    )
    log_level: str = _setting(
        "info",
        "Least severe log lines written: debug (adds probe requests and the tracebacks "
        "of start-up errors), info, warning or error.",
        "server",
        choices=("debug", "info", "warning", "error"),
    )
    # limits
    max_body_bytes: int = _setting(
        48 * MIB,
        "Largest request body; base64 audio is 4/3 of the file size.",
        "limits",
        "bytes",
    )
    max_audio_bytes: int = _setting(25 * MIB, "Largest single audio file.", "limits", "bytes")
    max_audio_seconds: float = _setting(
        600.0,
        "Most seconds of audio in one request (longer audio is split into 30 s segments).",
        "limits",
        "s",
    )
    max_audios_per_request: int = _setting(16, "Most audio items in one request.", "limits")
    max_messages: int = _setting(
        2048,
        "Most messages in one chat request (the window holds far fewer turns; older ones "
        "are dropped); 0 = no limit.",
        "limits",
    )
    max_tokens_limit: int = _setting(2048, "Upper bound for max_tokens in any request.", "limits")
    request_timeout: float = _setting(
        600.0, "Seconds a request may wait and run in all.", "limits", "s"
    )
    request_body_timeout: float = _setting(
        30.0,
        "Seconds a client may take to send a request body (from the request's start); "
        "slower ones get 408 and their connection is closed; 0 = no limit.",
        "limits",
        "s",
    )
    realtime_max_sessions: int = _setting(
        32,
        "Most /v1/realtime WebSocket sessions open at once; one more gets an error event "
        "and is closed.",
        "limits",
    )
    realtime_max_session_seconds: float = _setting(
        1800.0,
        "Longest a /v1/realtime session may stay open; then it gets an error event and is "
        "closed.",
        "limits",
        "s",
    )
    realtime_max_buffer_seconds: float = _setting(
        60.0,
        "Most seconds of audio a /v1/realtime session's input buffer may hold before it is "
        "committed; more gets an error event and the session is closed.",
        "limits",
        "s",
    )
    media_fetch_timeout: float = _setting(
        10.0, "Seconds allowed to fetch one remote audio.", "limits", "s"
    )
    # engine
    device: str = _setting(
        "auto", "auto, cpu, cuda or cuda:N (auto picks cuda:0 when present).", "engine",
        metavar="DEVICE",
    )
    dtype: str = _setting(
        "auto",
        "auto, bfloat16, float16 or float32 (auto: bfloat16 on GPUs that support it, "
        "else float16 on GPU, float32 on CPU).",
        "engine",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    cpu_threads: int = _setting(
        0,
        "Threads PyTorch may use on a CPU device; 0 = one fewer than the cores (at least 1), "
        "so the HTTP side keeps a core and compute threads do not spin against it.",
        "engine",
    )
    max_batch_size: int = _setting(
        0,
        "Most sequences decoded together in one forward pass; 0 = auto: 128 on a GPU (the "
        "largest CUDA graph; rows past what the KV cache holds wait), 8 on a CPU.",
        "engine",
    )
    max_model_len: int = _setting(
        0,
        "Longest prompt + answer in tokens; 0 = the checkpoint's max_position_embeddings. "
        "A sequence holds KV-cache blocks only for the tokens it has.",
        "engine",
    )
    kv_cache_memory_mb: int = _setting(
        0,
        "Memory for the KV cache in MiB; 0 = auto: --gpu-memory-fraction of the GPU minus "
        "what the weights use, or on a CPU room for --max-batch-size full-length sequences.",
        "engine",
    )
    kv_block_size: int = _setting(
        16, "Positions per KV-cache block (the unit sequences take cache memory in).",
        "engine",
    )
    random_weights: bool = _setting(
        False,
        "For speed tests only: the checkpoint's shapes with random weights, no weight file "
        "read (the answers are meaningless; a directory with config and tokenizer suffices).",
        "engine",
    )
    attention_backend: str = _setting(
        "auto",
        "Decode attention over the paged KV cache: triton (a kernel that reads each "
        "sequence's own blocks; CUDA with Triton installed), sdpa (PyTorch's attention over "
        "gathered blocks), or auto = triton where it can run, else sdpa.",
        "engine",
        choices=("auto", "triton", "sdpa"),
    )
    gpu_memory_fraction: float = _setting(
        0.9, "Share of the GPU's memory the server may use in all (auto KV-cache size).",
        "engine",
        metavar="FRACTION",
    )
    cuda_graphs: bool = _setting(
        True,
        "Replay decode steps from CUDA graphs captured at start (GPU only); "
        "--no-cuda-graphs runs every step eagerly.",
        "engine",
    )
    max_prefill_tokens: int = _setting(
        2048,
        "Most prompt tokens in one prefill pass; longer prompts are prefilled in chunks of "
        "this many, one chunk between two decode steps, so a running stream pauses for at "
        "most one chunk.",
        "engine",
    )
    prefix_caching: bool = _setting(
        True,
        "Keep the KV-cache blocks of earlier prompts and answers, keyed by their tokens and "
        "audio, and start a request from its longest cached prefix (later turns of a "
        "conversation skip its history); --no-prefix-caching computes every prompt anew.",
        "engine",
    )
    max_queue: int = _setting(64, "Most requests waiting for the model; more get 429.", "engine")
    engine_process: bool = _setting(
        True,
        "Run the model in a process of its own, so its Python never shares the GIL with "
        "HTTP work; --no-engine-process runs it in a thread of the server process.",
        "engine",
    )
    join_wait_steps: int = _setting(
        2,
        "While a batch runs with room to spare, a new request waits up to this many decode "
        "steps so that requests arriving close together join in one prefill (each join "
        "pauses every running row for one forward pass); 0 joins at once.",
        "engine",
    )
    stream_interval_ms: float = _setting(
        20.0,
        "A stream gets the text of up to this many ms in one chunk (the first text goes "
        "out at once); 0 sends every token as it is made.",
        "engine",
        "ms",
    )
    audio_cache_mb: int = _setting(
        256, "Memory for decoded audio features, in MiB (0 = off).", "engine"
    )
    # security
    api_key: str | None = _setting(
        None,
        "If set, every endpoint but /health, /live, /docs and /openapi.json needs "
        "'Authorization: Bearer KEY'.",
        "security",
        metavar="KEY",
    )
    allowed_origins: tuple[str, ...] = _setting(
        (),
        "CORS origins allowed to call the API; comma-separated, * for any. Default: none.",
        "security",
    )
    allowed_media_domains: tuple[str, ...] = _setting(
        (),
        "Hosts that audio_url may fetch over http(s); comma-separated. Default: none.",
        "security",
    )
    allowed_local_media_path: str | None = _setting(
        None,
        "Directory that file:// audio URLs and /test-audio/ may read. Default: none.",
        "security",
        metavar="DIR",
    )

    @property
    def served_names(self) -> tuple[str, ...]:
        """Names clients may send; the first is the one replies carry and /v1/models lists
        first. Several names (comma-separated) let clients that insist on e.g. whisper-1
        reach the model."""
        if not self.served_model_name:
            return (self.model,)
        return tuple(n.strip() for n in self.served_model_name.split(",") if n.strip())

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def setting_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def limit_name(field_name: str) -> str:
    """How an error names the limit it hit: the flag and the variable that set it."""
    return f"--{field_name.replace('_', '-')} / {env_name(field_name)}"
