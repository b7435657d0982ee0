"""Model of the tiny Qwen-Audio test checkpoint.

A small random-weight decoder-only transformer with an audio encoder, written for
the project's tests. It offers the public interface of the published
Qwen-Audio-Chat remote code (`chat`, `generate(..., audio_info=...,
stop_words_ids=...)`, legacy tuple KV cache) and deliberately keeps the quirks a
server has to live with:

* rotary positions come from the KV-cache length; `position_ids` are accepted and
  ignored, so left padding shifts a row's absolute positions (attention only sees
  relative positions, so results do not change);
* the cache is a tuple per layer of (key, value), each [batch, seq, heads, dim];
* audio features replace the embeddings of each `<audio>...</audio>` span on the
  first forward pass only;
* `chat` decodes the whole sequence and slices the prompt text off, and (like the
  published decoder) loses the last token when generation ends without a stop word.
"""

import copy
import math
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_tiny_qwen import TinyQwenAudioConfig

HistoryType = List[Tuple[str, str]]
LayerPast = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).type_as(x) * self.weight


def rotary_tables(positions: torch.Tensor, dim: int, base: float, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables shaped [1, seq, 1, dim] for the given absolute positions.

    Computed on the fly rather than kept as buffers: non-persistent buffers are
    not restored when transformers builds the model on the meta device.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TinyAttention(nn.Module):
    def __init__(self, config: TinyQwenAudioConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.rotary_dim = int(self.head_dim * config.rotary_pct)
        self.rotary_base = config.rotary_emb_base
        self.scale = config.scale_attn_weights
        proj = self.n_head * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * proj, bias=True)
        self.c_proj = nn.Linear(proj, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden: torch.Tensor,
        past: Optional[LayerPast],
        additive_mask: Optional[torch.Tensor],
        use_cache: bool,
    ):
        bsz, q_len, _ = hidden.shape
        q, k, v = self.c_attn(hidden).split(self.n_head * self.head_dim, dim=-1)
        q = q.view(bsz, q_len, self.n_head, self.head_dim)
        k = k.view(bsz, q_len, self.n_head, self.head_dim)
        v = v.view(bsz, q_len, self.n_head, self.head_dim)

        # Positions only depend on how much is cached, never on position_ids.
        past_len = past[0].shape[1] if past is not None else 0
        positions = torch.arange(past_len, past_len + q_len, device=hidden.device)
        cos, sin = rotary_tables(positions, self.rotary_dim, self.rotary_base, q.dtype)
        r = self.rotary_dim
        q = torch.cat([apply_rotary(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([apply_rotary(k[..., :r], cos, sin), k[..., r:]], dim=-1)

        if past is not None:
            k = torch.cat([past[0], k], dim=1)
            v = torch.cat([past[1], v], dim=1)
        present = (k, v) if use_cache else None

        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
        scores = torch.matmul(qh, kh.transpose(-1, -2))
        if self.scale:
            scores = scores / math.sqrt(self.head_dim)
        k_len = kh.shape[-2]
        # Query i sits at absolute index past_len + i and may see keys up to it.
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=hidden.device).tril(k_len - q_len)
        min_value = torch.finfo(scores.dtype).min
        scores = torch.where(causal, scores, torch.full([], min_value, dtype=scores.dtype, device=scores.device))
        if additive_mask is not None:
            scores = scores + additive_mask
        probs = F.softmax(scores.float(), dim=-1).type_as(vh)
        out = torch.matmul(probs, vh).transpose(1, 2).reshape(bsz, q_len, -1)
        return self.c_proj(out), present


class TinyMLP(nn.Module):
    def __init__(self, config: TinyQwenAudioConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w_gate = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w_up = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, x):
        return self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x))


class TinyBlock(nn.Module):
    def __init__(self, config: TinyQwenAudioConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = TinyAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = TinyMLP(config)

    def forward(self, hidden, past, additive_mask, use_cache):
        attn_out, present = self.attn(self.ln_1(hidden), past, additive_mask, use_cache)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.ln_2(hidden))
        return hidden, present


# --------------------------------------------------------------------------- #
# Audio encoder
# --------------------------------------------------------------------------- #


def sinusoids(length: int, channels: int, device=None) -> torch.Tensor:
    """Fixed sinusoidal positions [length, channels] for the audio frames."""
    half = channels // 2
    step = math.log(10000) / max(half - 1, 1)
    freqs = torch.exp(-step * torch.arange(half, device=device, dtype=torch.float32))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TinyAudioLayer(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_attn = nn.LayerNorm(n_state)
        self.qkv = nn.Linear(n_state, 3 * n_state)
        self.out = nn.Linear(n_state, n_state)
        self.ln_mlp = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 2 * n_state), nn.GELU(), nn.Linear(2 * n_state, n_state))

    def forward(self, x, keep):
        # keep: [batch, frames] bool, False for frames past the audio's real end, so
        # the zero padding of short audios does not leak into their features.
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_mlp(x))


class TinyAudioEncoder(nn.Module):
    """80 x 3000 log-mel -> 750 vectors of output_dim (conv s1, conv s2, avg-pool 2)."""

    def __init__(self, n_mels=80, n_state=64, n_head=4, n_layer=2, output_dim=64, **_unused):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(TinyAudioLayer(n_state, n_head) for _ in range(n_layer))
        self.ln_post = nn.LayerNorm(n_state)
        self.proj = nn.Linear(n_state, output_dim)
        # Learned vectors written at the <audio> and </audio> positions.
        self.audio_bos_eos_token = nn.Embedding(2, output_dim)

    def forward(self, mels: torch.Tensor, frames_after_cnn: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mels.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [b, 1500, n_state]
        x = x + sinusoids(x.shape[1], x.shape[2], x.device).to(x.dtype)
        idx = torch.arange(x.shape[1], device=x.device)[None, :]
        keep = idx < frames_after_cnn.to(x.device)[:, None].clamp(min=1)
        for layer in self.layers:
            x = layer(x, keep)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        return self.proj(self.ln_post(x))  # [b, 750, output_dim]

    def encode(self, audio_info_list: Sequence[Dict[str, Any]]) -> List[torch.Tensor]:
        """One [span, dim] tensor per audio, in the order of the given dicts."""
        mels = torch.cat([info["input_audios"] for info in audio_info_list])
        lengths = torch.cat([info["input_audio_lengths"] for info in audio_info_list])
        spans = [s for info in audio_info_list for s in info["audio_span_tokens"]]
        feats = self.forward(mels, lengths[:, 0])
        bos = self.audio_bos_eos_token.weight[0:1]
        eos = self.audio_bos_eos_token.weight[1:2]
        return [torch.cat([bos, feats[i, : span - 2], eos]) for i, span in enumerate(spans)]


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


class TinyQwenAudioPreTrainedModel(PreTrainedModel):
    config_class = TinyQwenAudioConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["TinyBlock"]
    # transformers 4.53 still treats a model without `_supports_cache_class` as
    # legacy-cache only: GenerationMixin then neither creates a DynamicCache nor
    # converts ours, and passes our tuple of (key, value) per layer back in as
    # returned. Stated explicitly because the published code relies on exactly this.
    _supports_cache_class = False
    _supports_static_cache = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class TinyQwenAudioModel(TinyQwenAudioPreTrainedModel):
    def __init__(self, config: TinyQwenAudioConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(TinyBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.audio = TinyAudioEncoder(**config.audio)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _audio_features(self, input_ids, audio_info):
        start_id = self.config.audio["audio_start_id"]
        starts = torch.where(input_ids == start_id)
        ends = torch.where(input_ids == start_id + 1)
        if starts[0].numel() != ends[0].numel() or not torch.equal(starts[0], ends[0]):
            raise ValueError("unbalanced <audio> / </audio> tokens in input_ids")
        if audio_info is None:
            raise ValueError("input_ids contain <audio> but no audio_info was given")
        infos = [audio_info] if isinstance(audio_info, dict) else list(audio_info)
        feats = self.audio.encode(infos)
        if len(feats) != starts[0].numel():
            raise ValueError(f"{starts[0].numel()} audio spans in input_ids but {len(feats)} audios")
        spans = list(zip(starts[0].tolist(), starts[1].tolist(), ends[1].tolist(), strict=True))
        return spans, feats

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[LayerPast, ...]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        audio_info: Union[Dict, List[Dict], None] = None,
    ):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if not past_key_values:
            past_key_values = None

        audio_spans = None
        if past_key_values is None and input_ids is not None:
            if torch.any(input_ids == self.config.audio["audio_start_id"]):
                audio_spans = self._audio_features(input_ids, audio_info)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden = inputs_embeds
        if audio_spans is not None:
            hidden = hidden.clone()
            for (row, a, b), feat in zip(*audio_spans, strict=True):
                if b - a + 1 != feat.shape[0]:
                    raise ValueError(f"audio span of {b - a + 1} tokens but {feat.shape[0]} features")
                hidden[row, a : b + 1] = feat.to(hidden.dtype)

        additive = None
        if attention_mask is not None:
            # [batch, total_len] of 0/1 -> additive [batch, 1, 1, total_len].
            m = attention_mask.view(hidden.shape[0], -1)[:, None, None, :].to(hidden.dtype)
            additive = (1.0 - m) * torch.finfo(hidden.dtype).min

        presents = () if use_cache else None
        all_hidden = () if output_hidden_states else None
        layer_pasts = past_key_values if past_key_values is not None else (None,) * len(self.h)
        for block, past in zip(self.h, layer_pasts, strict=True):
            if output_hidden_states:
                all_hidden = all_hidden + (hidden,)
            hidden, present = block(hidden, past, additive, use_cache)
            if use_cache:
                presents = presents + (present,)
        hidden = self.ln_f(hidden)
        if output_hidden_states:
            all_hidden = all_hidden + (hidden,)

        if not return_dict:
            return tuple(x for x in (hidden, presents, all_hidden) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=presents, hidden_states=all_hidden)


class StopWordsLogitsProcessor(LogitsProcessor):
    """Once a row ends with a stop sequence, force eos so generation stops there."""

    def __init__(self, stop_words_ids: List[List[int]], eos_token_id: int):
        if not isinstance(stop_words_ids, list) or not stop_words_ids:
            raise ValueError(f"stop_words_ids must be a non-empty list of lists, got {stop_words_ids}")
        for seq in stop_words_ids:
            if not isinstance(seq, list) or not seq or any(int(t) < 0 for t in seq):
                raise ValueError(f"each stop word must be a non-empty list of ids, got {stop_words_ids}")
        # A stop word equal to eos needs no forcing: generation already stops on it.
        self.stop_words_ids = [list(map(int, s)) for s in stop_words_ids if list(s) != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            tail = input_ids[row].tolist()
            if any(len(s) <= len(tail) and tail[-len(s) :] == s for s in self.stop_words_ids):
                scores[row, self.eos_token_id] = float(2**15)
        return scores


class TinyQwenAudioLMHeadModel(TinyQwenAudioPreTrainedModel, GenerationMixin):
    def __init__(self, config: TinyQwenAudioConfig):
        super().__init__(config)
        if config.bf16 + config.fp16 + config.fp32 > 1:
            raise ValueError('Only one of "bf16", "fp16", "fp32" can be true')
        self.transformer = TinyQwenAudioModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.bf16:
            self.transformer.bfloat16()
            self.lm_head.bfloat16()
        elif config.fp16:
            self.transformer.half()
            self.lm_head.half()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # Like the published model: put mel_filters.npz beside this module, where
        # the audio front end of a tokenizer loaded from the same code looks for it.
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise ValueError("the tiny test model only loads from a local directory")
        src = os.path.join(path, "mel_filters.npz")
        if os.path.isfile(src):
            dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mel_filters.npz")
            if os.path.abspath(src) != dst:
                shutil.copyfile(src, dst)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        audio_info = kwargs.pop("audio_info", None)
        token_type_ids = kwargs.get("token_type_ids")
        if past_key_values:
            # Everything but the newest token is already in the cache.
            input_ids = input_ids[:, -1:]
            if token_type_ids is not None:
                token_type_ids = token_type_ids[:, -1:]

        attention_mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None and position_ids is None:
            # Computed like the published code does, then ignored by forward().
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -1:]
        else:
            position_ids = None

        if inputs_embeds is not None and not past_key_values:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(
            {
                "past_key_values": past_key_values,
                "use_cache": kwargs.get("use_cache"),
                "position_ids": position_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
                # Only the first pass (no cache) reads it; later passes ignore it.
                "audio_info": audio_info,
            }
        )
        return model_inputs

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Tuple[LayerPast, ...]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        head_mask=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        audio_info: Union[Dict, List[Dict], None] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        out = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            audio_info=audio_info,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(logits.device)
            )
        if not return_dict:
            rest = tuple(x for x in (logits, out.past_key_values, out.hidden_states) if x is not None)
            return ((loss,) + rest) if loss is not None else rest
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)

    # ----- generation -------------------------------------------------------

    def generate(
        self,
        inputs: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus: Optional[bool] = None,
        assistant_model=None,
        streamer=None,
        **kwargs,
    ):
        generation_config = generation_config if generation_config is not None else self.generation_config
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        if stop_words_ids is None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        if stop_words_ids is not None:
            processor = StopWordsLogitsProcessor(stop_words_ids, generation_config.eos_token_id)
            logits_processor = LogitsProcessorList(logits_processor or [])
            logits_processor.append(processor)
        return super().generate(
            inputs,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            synced_gpus=synced_gpus,
            assistant_model=assistant_model,
            streamer=streamer,
            **kwargs,
        )

    def chat(
        self,
        tokenizer,
        query: str,
        history: Optional[HistoryType],
        system: str = "You are a helpful assistant.",
        append_history: bool = True,
        stop_words_ids: Optional[List[List[int]]] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> Tuple[str, HistoryType]:
        generation_config = generation_config if generation_config is not None else self.generation_config
        if getattr(generation_config, "chat_format", "chatml") != "chatml":
            raise ValueError("only the chatml chat format is supported")
        history = copy.deepcopy(history) if history is not None else []
        stop_words_ids = list(stop_words_ids) if stop_words_ids is not None else []

        max_window_size = kwargs.pop("max_window_size", None)
        if max_window_size is None:
            max_window_size = getattr(generation_config, "max_window_size", 6144)
        raw_text, context_tokens, audio_info = build_chatml_context(tokenizer, query, history, system, max_window_size)
        stop_words_ids.extend([[tokenizer.im_end_id], [tokenizer.im_start_id]])

        input_ids = torch.tensor([context_tokens], device=self.device)
        kwargs["audio_info"] = audio_info
        outputs = self.generate(
            input_ids,
            stop_words_ids=stop_words_ids,
            return_dict_in_generate=False,
            generation_config=generation_config,
            **kwargs,
        )
        response = decode_chatml_response(
            outputs[0].tolist(), tokenizer, len(raw_text), len(context_tokens), audio_info
        )
        history.append((query, response))
        return response, history


# --------------------------------------------------------------------------- #
# ChatML prompt building and response decoding
# --------------------------------------------------------------------------- #


def build_chatml_context(
    tokenizer, query: str, history: HistoryType, system: str, max_window_size: int
) -> Tuple[str, List[int], Optional[Dict]]:
    """(raw_text, token ids, audio_info) of a ChatML prompt, the published layout.

    Each turn's text is tokenised on its own with the audio tags allowed as special
    tokens (and <|im_start|>/<|im_end|> treated as plain text), so audios are decoded
    once per turn and once more for the whole prompt. The oldest history turns are
    dropped first when the prompt would reach max_window_size.
    """
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    nl = tokenizer.encode("\n")
    audio_special = set(tokenizer.AUDIO_ST)

    def turn(role: str, content: str) -> Tuple[str, List[int]]:
        info = tokenizer.process_audio(content)
        ids = tokenizer.encode(role, allowed_special=audio_special, audio_info=info)
        ids += nl + tokenizer.encode(content, allowed_special=audio_special, audio_info=info)
        return f"{role}\n{content}", ids

    system_text, system_ids = turn("system", system)
    system_tokens = [tokenizer.im_start_id] + system_ids + [tokenizer.im_end_id]

    context: List[int] = []
    raw_history = ""
    for past_query, past_response in reversed(history):
        q_text, q_ids = turn("user", past_query)
        q_tokens = [tokenizer.im_start_id] + q_ids + [tokenizer.im_end_id]
        if past_response is not None:
            r_text, r_ids = turn("assistant", past_response)
            r_tokens = [tokenizer.im_start_id] + r_ids + [tokenizer.im_end_id]
            turn_tokens = nl + q_tokens + nl + r_tokens
            turn_text = f"\n{im_start}{q_text}{im_end}\n{im_start}{r_text}{im_end}"
        else:
            turn_tokens = nl + q_tokens + nl
            turn_text = f"\n{im_start}{q_text}{im_end}\n"
        if len(system_tokens) + len(turn_tokens) + len(context) >= max_window_size:
            break
        context = turn_tokens + context
        raw_history = turn_text + raw_history

    _, query_ids = turn("user", query)
    tokens = (
        system_tokens
        + context
        + nl
        + [tokenizer.im_start_id]
        + query_ids
        + [tokenizer.im_end_id]
        + nl
        + [tokenizer.im_start_id]
        + tokenizer.encode("assistant")
        + nl
    )
    raw_text = f"{im_start}{system_text}{im_end}{raw_history}\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"
    return raw_text, tokens, tokenizer.process_audio(raw_text)


def decode_chatml_response(
    tokens: List[int], tokenizer, raw_text_len: int, context_length: int, audio_info: Optional[Dict]
) -> str:
    """Response text: decode up to the first <|im_end|>/<|im_start|>, drop the prompt.

    Mirrors the published decoder, including its off-by-one: when no stop token
    was generated the cut falls on the last generated token, which is lost.
    """
    stop_ids = (tokenizer.im_start_id, tokenizer.im_end_id)
    cut = context_length
    for cut in range(context_length, len(tokens)):
        if tokens[cut] in stop_ids:
            break
    text = tokenizer.decode(tokens[:cut], errors="replace", audio_info=audio_info)
    return text[raw_text_len:].strip()
