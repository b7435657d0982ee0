"""Configuration of the tiny Qwen-Audio test checkpoint.

Field names follow the published Qwen-Audio-Chat config.json so that code reading
the config (vocab size, audio start id, precision flags, window sizes) behaves the
same on the tiny model as on the real one.
"""

from transformers import PretrainedConfig


class TinyQwenAudioConfig(PretrainedConfig):
    model_type = "tiny_qwen_audio"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=16,
        intermediate_size=128,
        seq_length=2048,
        max_position_embeddings=8192,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
        rotary_emb_base=10000,
        rotary_pct=1.0,
        scale_attn_weights=True,
        no_bias=True,
        use_cache=True,
        bf16=False,
        fp16=False,
        fp32=True,
        audio=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.intermediate_size = intermediate_size
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.rotary_emb_base = rotary_emb_base
        self.rotary_pct = rotary_pct
        self.scale_attn_weights = scale_attn_weights
        self.no_bias = no_bias
        self.use_cache = use_cache
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        # Same keys as the published "audio" block; audio_start_id is the id of
        # "<audio>" and "</audio>" is assumed to be the next id.
        self.audio = dict(
            {
                "n_mels": 80,
                "n_ctx": 1500,
                "n_state": 64,
                "n_head": 4,
                "n_layer": 2,
                "output_dim": hidden_size,
                "avg_pool": True,
                "add_audio_bos_eos_token": True,
                "audio_start_id": None,
            },
            **(audio or {}),
        )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
