"""The decoder CAT tunes (Llama, Qwen2, Mistral), written out: attention that can hand back its
probabilities (CAT §3.1) or the attention mass on causal tokens (CAT §4.2), KV-cache greedy
generation, Hugging Face-layout loading and saving, and hand-written LoRA (Hu et al. 2021)."""
import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cli import InputError, atomic_files, atomic_path, run_cli

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ALIASES = {"tinyllama": "TinyLlama/TinyLlama_v1.1", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
           "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
           "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json", "adapter_config.json"]
BIN_WEIGHTS = "pytorch_model*.bin"   # the older weights format: fetched only without safetensors, converted once


@dataclass
class ModelArgs:
    architecture: str = "LlamaForCausalLM"   # architectures[0]
    vocab_size: int = 32000                  # vocab_size (V)
    dim: int = 4096                          # hidden_size
    n_layers: int = 32                       # num_hidden_layers (L)
    n_heads: int = 32                        # num_attention_heads (H)
    n_kv_heads: int = 32                     # num_key_value_heads (grouped-query attention when < H)
    head_dim: int = 128                      # head_dim, else hidden_size // num_attention_heads (D)
    hidden_dim: int = 11008                  # intermediate_size (SwiGLU width)
    norm_eps: float = 1e-5                   # rms_norm_eps
    rope_theta: float = 10000.0              # rope_theta, or rope_parameters["rope_theta"]
    rope_scaling: dict | None = None         # rope_scaling, or the rest of rope_parameters; None = plain RoPE
    attention_bias: bool = False             # attention_bias: q, k, v, o with biases (Qwen2: q, k, v always)
    mlp_bias: bool = False                   # mlp_bias
    tie_word_embeddings: bool = False        # tie_word_embeddings: lm_head shares embed_tokens.weight
    sliding_window: int | None = None        # sliding_window (when use_sliding_window is not false): not implemented,
                                             # so longer sequences are refused
    init_std: float = 0.02                   # initializer_range (weights of a model trained from scratch)
    extra: dict = field(default_factory=dict)  # every other key of config.json, written back unchanged

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise InputError(f"config.json: architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise InputError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported, only 'silu' (SwiGLU)")
        # newer configs hold theta and scaling in one rope_parameters dict, older ones in two keys
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise InputError(f"config.json: RoPE type {rope_type!r} is not supported: 'default', 'linear', 'llama3'")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in cfg]
        if missing:
            raise InputError(f"config.json: no {', '.join(missing)}: a Llama, Qwen2 or Mistral config.json has them")
        args = cls(architecture=arch, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
                   n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                   hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                   attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
                   tie_word_embeddings=cfg.get("tie_word_embeddings", False), sliding_window=window,
                   init_std=cfg.get("initializer_range", 0.02))
        written = args.to_hf_config().keys() | {"rope_parameters"}  # rope_parameters goes back as its two old keys
        args.extra = {k: v for k, v in cfg.items() if k not in written}
        return args

    def to_hf_config(self) -> dict:
        return {**self.extra, "architectures": [self.architecture], "model_type": ARCHITECTURES[self.architecture],
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.hidden_dim, "hidden_act": "silu", "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
                "tie_word_embeddings": self.tie_word_embeddings, "sliding_window": self.sliding_window,
                "use_sliding_window": self.sliding_window is not None, "initializer_range": self.init_std}


@dataclass
class ModelOutput:
    logits: torch.Tensor                        # (B, T, V); (N, V) with logits_at; (B, 1, V) with last_only
    attentions: list[torch.Tensor] | None       # per layer (B, H, T, S) softmax probabilities, float32
    causal_mass: torch.Tensor | None            # (B, R) mean over layers and heads of sum_j P_ij * M_ij, row i of
                                                # causal_rows
    cache: "KVCache | None"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in float32, then back to the input's dtype
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_frequencies(args: ModelArgs, device) -> torch.Tensor:
    """Inverse frequencies theta^(-2k/D) of RoPE, with Llama-3's or linear scaling: (D/2,)."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)
    scaling = args.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":  # long wavelengths slowed by `factor`, short kept, the band between blended
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > context / low, inv_freq / factor,
                               torch.where(wavelen < context / high, inv_freq, blended))
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by its positions, in float32. Hugging Face's split-halves pairing (dimension k
    with k + D/2), so their checkpoints load as they are; Meta's original code pairs neighbours (2k, 2k+1)
    instead, which would need q_proj and k_proj rows permuted."""
    x32 = x.float()
    rotated = torch.cat([-x32[..., x.shape[-1] // 2:], x32[..., :x.shape[-1] // 2]], dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, per layer: views (B, H_kv, S, D) of buffers that hold `size`
    positions, allocated at the first update. A new token is written in place; growing the cache by torch.cat
    instead copies all of it, every layer, at every token (64 rows at 500 positions: more bytes than the weights)."""

    def __init__(self, size: int):
        self.size, self.filled, self.keys, self.values = size, {}, {}, {}

    def length(self) -> int:
        return self.filled.get(0, 0)

    def update(self, layer: int, k, v):
        start, T = self.filled.get(layer, 0), k.shape[2]
        if start + T > self.size:
            raise ValueError(f"KVCache: {start + T} positions do not fit in its size {self.size}; make it larger")
        if layer not in self.keys:
            shape = (k.shape[0], k.shape[1], self.size, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        self.keys[layer][:, :, start:start + T] = k
        self.values[layer][:, :, start:start + T] = v
        self.filled[layer] = start + T
        return self.keys[layer][:, :, :start + T], self.values[layer][:, :, :start + T]

    def keep(self, rows):
        """Only these batch rows (a bool mask or indices) from now on."""
        for layer in self.keys:
            self.keys[layer], self.values[layer] = self.keys[layer][rows], self.values[layer][rows]


def _row_visibility(rows, visible, S: int):
    """The keys that query rows (B, R) may attend to: their rows of visible (B, 1, T, S), or j <= i when None."""
    if visible is None:
        return (torch.arange(S, device=rows.device) <= rows[..., None])[:, None]        # (B, 1, R, S)
    return visible.gather(2, rows[:, None, :, None].expand(-1, 1, -1, S))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        qkv_bias = args.attention_bias or args.architecture == "Qwen2ForCausalLM"
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.attention_bias)

    def forward(self, x, cos, sin, visible, cache=None, return_attn=False, causal_rows=None, causal_row_mask=None):
        """x (B, T, dim); visible (B, 1, T, S) bool, True = query i may attend to key j, or None = j <= i (S == T);
        causal_rows (B, R) long and causal_row_mask (B, R, S) bool, the rows of the CAT mask that hold causal tokens.
        Returns the output (B, T, dim), the probabilities (B, H, T, S) or None, the causal mass (B, R) or None."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, D).transpose(1, 2)       # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)    # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)    # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                             # (B, H_kv, S, D)
        n_rep = self.n_heads // self.n_kv_heads
        probs = None
        if return_attn or causal_rows is not None:
            # grouped-query attention: kv head g serves query heads g*n .. g*n + n - 1
            k_all = k.repeat_interleave(n_rep, dim=1)                          # (B, H, S, D)
        if return_attn:  # CAT §3.1 written out: softmax(Q Kᵀ / sqrt(d_k)) · V
            k, v = k_all, v.repeat_interleave(n_rep, dim=1)                    # (B, H, S, D)
            S = k.shape[2]
            allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T) if visible is None else visible
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(D)         # (B, H, T, S)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # float32 attention map
            out = probs.to(v.dtype) @ v                                       # (B, H, T, D)
        else:  # the same, fused, without forming the map
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None,
                                                 enable_gqa=n_rep > 1)   # kv head g serves query heads g*n ..
        mass = None
        if causal_rows is not None:
            # CAT §4.2 fast path (docs/design.md, "Speed"): the loss reads, of the attention map, only the
            # rows that hold causal tokens, and of each such row only m_i = sum_j P_ij M_ij. So §3.1's softmax is
            # written out for those R rows alone, (R × S) a head instead of (T × S), beside the fused call.
            R = causal_rows.shape[1]
            q_rows = q.gather(2, causal_rows[:, None, :, None].expand(B, self.n_heads, R, D))   # (B, H, R, D)
            scores = (q_rows @ k_all.transpose(-2, -1)).float() / math.sqrt(D)   # (B, H, R, S)
            row_visible = _row_visibility(causal_rows, visible, k.shape[2])   # (B, 1, R, S)
            p_rows = scores.masked_fill(~row_visible, float("-inf")).softmax(dim=-1)
            mass = (p_rows * causal_row_mask[:, None]).sum(-1).mean(dim=1)     # (B, R), mean over heads
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * D)             # heads concatenated
        return self.o_proj(out), probs, mass


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, visible, cache, return_attn, causal_rows, causal_row_mask):
        h, probs, mass = self.self_attn(self.input_layernorm(x), cos, sin, visible, cache=cache,
                                        return_attn=return_attn, causal_rows=causal_rows,
                                        causal_row_mask=causal_row_mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), probs, mass


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._inv_freq = None   # RoPE's frequencies, computed on first use on the model's device (rope)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=args.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, position_ids):
        """cos, sin (B, 1, T, D) of RoPE at these positions (B, T); the frequencies are computed once per device."""
        device = position_ids.device
        if getattr(self, "_inv_freq", None) is None or self._inv_freq.device != device:
            self._inv_freq = rope_frequencies(self.args, device)              # (D/2,)
        angles = position_ids[..., None].float() * self._inv_freq            # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]                 # (B, 1, T, D)
        return angles.cos(), angles.sin()

    def forward(self, input_ids, attention_mask=None, *, position_ids=None, cache=None, return_attn=False,
                causal_rows=None, causal_row_mask=None, logits_at=None, last_only=False) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, S), 1 = real token, S = cached + new tokens, None = all real (or
        right padding, whose pad positions no real token sees under j <= i); position_ids (B, T), by default counted
        over the real tokens; causal_rows (B, R) long and causal_row_mask (B, R, T) bool: the rows of the CAT mask
        that hold causal tokens (cat.causal_rows), to return their causal_mass (B, R); logits_at (N,) long, flat
        positions b·T + t: logits there only, (N, V), as L_next reads them; last_only: logits of the last
        position only, (B, 1, V), as generation needs."""
        B, T = input_ids.shape
        past = cache.length() if cache is not None else 0
        S = past + T
        if self.args.sliding_window is not None and S > self.args.sliding_window:
            raise ValueError(f"{S} tokens exceed the sliding window ({self.args.sliding_window}), not implemented")
        if causal_rows is not None and past:
            raise ValueError("causal_rows needs the whole sequence in one call, without a KV cache")
        visible = None   # (B, 1, T, S) True = query i may attend to key j; None = j <= i, for the fused kernel
        if attention_mask is None:
            position_ids = position_ids if position_ids is not None else \
                torch.arange(past, S, device=input_ids.device).expand(B, T)
            if past:
                visible = torch.ones(1, 1, T, S, dtype=torch.bool, device=input_ids.device).tril(past)
        else:
            real = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            # query i sits at cache position past + i and sees key j <= past + i that is a real token; a padding
            # token also sees itself, so that no row is empty (an all -inf row would softmax to NaN)
            q_pos = torch.arange(past, S, device=input_ids.device)[:, None]
            k_pos = torch.arange(S, device=input_ids.device)[None, :]
            visible = ((k_pos <= q_pos) & (real[:, None, :] | (k_pos == q_pos)))[:, None]    # (B, 1, T, S)
            if past == 0 and not (real[:, 1:] & ~real[:, :-1]).any():
                visible = None  # no real token after a pad (right padding): j <= i alone is exact for real rows
        cos, sin = self.rope(position_ids)
        x = self.model.embed_tokens(input_ids)                                # (B, T, dim)
        attentions, masses = [], []
        for layer in self.model.layers:
            x, probs, mass = layer(x, cos, sin, visible, cache, return_attn, causal_rows, causal_row_mask)
            attentions.append(probs)
            masses.append(mass)
        if logits_at is not None:
            x = x.flatten(0, 1).index_select(0, logits_at)                    # (N, dim): the loss positions only
        elif last_only:
            x = x[:, -1:]                                                     # (B, 1, dim)
        logits = self.lm_head(self.model.norm(x))                             # (B, T, V), (N, V) or (B, 1, V)
        causal_mass = torch.stack(masses).mean(0) if causal_rows is not None else None   # (B, R), mean over layers
        return ModelOutput(logits=logits, attentions=attentions if return_attn else None,
                           causal_mass=causal_mass, cache=cache)


@contextlib.contextmanager
def linear_weights_in(model: nn.Module, dtype: torch.dtype | None):
    """For the block, every linear layer's float32 weight and bias held in `dtype`, cast once: the numbers that
    autocast multiplies, without autocast's cast at every call. (Autocast keeps its cast copy only of a weight
    that requires grad, and not under inference_mode: decoding would cast the whole model again for each new
    token, half of a CPU decoding step.) A tied lm_head is untied for the block only. dtype None: no change."""
    swapped = []
    try:       # a cast that fails halfway (out of memory) still puts back the ones done
        for module in model.modules() if dtype is not None else []:
            if isinstance(module, nn.Linear):
                for name in ("weight", "bias"):
                    value = getattr(module, name)
                    if value is not None and value.dtype == torch.float32:
                        cast = nn.Parameter(value.detach().to(dtype), requires_grad=False)
                        swapped.append((module, name, value))
                        setattr(module, name, cast)
        yield
    finally:
        for module, name, value in swapped:
            setattr(module, name, value)


@torch.inference_mode()   # no autograd bookkeeping at all while decoding
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """Greedy decoding of a batch, left-padded, with a KV cache. Returns each prompt's new tokens, EOS excluded.
    Rows that have emitted EOS leave the batch once they are a quarter of it: the answers still being written
    then decode at the cost of their own number, not the batch's, and the cache is copied a few times, not at
    every finish. (One worked solution that never ends would otherwise keep all 64 rows decoding to the end.)"""
    if not all(prompts):
        raise ValueError("generate: every prompt needs at least one token (prepend BOS to an empty text)")
    device = next(model.parameters()).device
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)     # (B, T)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
    eos = torch.tensor(eos_ids, device=device)
    cache = KVCache(longest + max_new_tokens)
    new = torch.full((len(prompts), max_new_tokens), pad_id, device=device)  # (B, max_new_tokens)
    rows = torch.arange(len(prompts), device=device)                          # (b,) the prompts still decoding
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)         # (b,) emitted EOS
    was_training = model.training
    model.eval()
    autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    with linear_weights_in(model, autocast_dtype):
        logits = model(ids, mask, cache=cache, last_only=True).logits
        for step in range(max_new_tokens):
            token = torch.where(done, pad_id, logits[:, -1].argmax(-1))       # (b,)
            new[rows, step] = token
            done |= torch.isin(token, eos)
            if done.all() or step == max_new_tokens - 1:    # no forward pass for logits nobody reads
                break
            if 4 * done.sum() >= len(done):     # a quarter of the batch has finished: those rows leave it
                going = ~done
                rows, token, mask, done = rows[going], token[going], mask[going], done[going]
                cache.keep(going)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(token[:, None], mask, cache=cache, last_only=True).logits
    model.train(was_training)
    return [row[:next((i for i, t in enumerate(row) if t in eos_ids), len(row))] for row in new.tolist()]


def _read_json(path: Path) -> dict:
    """A JSON file of a model folder as a dict; {} when it does not exist."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); restore the file from the model's "
                         "source") from None


def _token(value) -> str | None:
    """A special token of tokenizer_config.json: a string, a dict with "content", or null."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Thin wrapper over tokenizers.Tokenizer with the model's special ids."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id, eos_ids: list[int], pad_id: int, config=None):
        self.backend, self.bos_id, self.eos_ids, self.pad_id = backend, bos_id, eos_ids, pad_id
        self.config = config or {}  # tokenizer_config.json, written back by save()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: the model folder needs this tokenizer file")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config, gen, model_cfg = (_read_json(path / n) for n in
                                  ("tokenizer_config.json", "generation_config.json", "config.json"))

        def token_id(name):
            token = _token(config.get(name))
            return backend.token_to_id(token) if token is not None else None

        # BOS when the model's tokenizer adds it: said in tokenizer_config, else done by the post-processor
        bos_id = token_id("bos_token") if config.get("add_bos_token") else None
        if "add_bos_token" not in config:
            plain, special = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
            bos_id = special[0] if len(special) > len(plain) and special[0] != plain[0] else None
        eos_ids = [token_id("eos_token")]  # the tokenizer's own first: it ends training texts
        for source in (gen, model_cfg):
            value = source.get("eos_token_id")
            eos_ids += value if isinstance(value, list) else [value]
        eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        if not eos_ids:
            raise ValueError(f"{path}: no EOS token in tokenizer_config.json, generation_config.json or config.json")
        pad_id = next((i for i in (token_id("pad_token"), gen.get("pad_token_id"), model_cfg.get("pad_token_id"))
                       if i is not None), eos_ids[0])
        return cls(backend, bos_id, eos_ids, pad_id, config)

    def save(self, out_dir) -> None:
        """tokenizer.json, tokenizer_config.json and generation_config.json, written together (cli.atomic_files)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.backend.id_to_token(self.eos_ids[0]),
                  "pad_token": self.backend.id_to_token(self.pad_id), **self.config,
                  "add_bos_token": self.bos_id is not None}   # read back by from_dir: the same prompt prefix
        if self.bos_id is not None:
            config.setdefault("bos_token", self.backend.id_to_token(self.bos_id))
        generation = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_ids, "pad_token_id": self.pad_id}
        with atomic_files(out_dir) as path:
            self.backend.save(str(path("tokenizer.json")))
            path("tokenizer_config.json").write_text(json.dumps(config, indent=2))
            path("generation_config.json").write_text(json.dumps(generation, indent=2))


def _check_tensors(expected: dict, found: dict, source, optional=()) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor. expected: name -> shape."""
    for name in found:
        if name not in expected:
            raise ValueError(f"{source}: unexpected tensor {name} {tuple(found[name].shape)}")
        if tuple(found[name].shape) != tuple(expected[name]):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(found[name].shape)}, "
                             f"the config expects {tuple(expected[name])}")
    for name in expected:
        if name not in found and name not in optional:
            raise ValueError(f"{source}: missing tensor {name}, expected shape {tuple(expected[name])}")


def resolve(name_or_path: str) -> Path:
    """An alias, a local folder or a hub id -> a local folder."""
    name = ALIASES.get(name_or_path, name_or_path)
    if Path(name).is_dir():
        return Path(name)
    local = Path(name).parts[0] if Path(name).parts else ""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (local != name and Path(local).is_dir()):
        raise InputError(f"{name_or_path}: no such folder (a path, so it is not looked up on the hub)")
    if "/" not in name:
        raise InputError(f"{name_or_path!r} is neither a model folder nor a hub id (owner/name) "
                         f"nor an alias: {sorted(ALIASES)}")
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_FILES, token=os.environ.get("HF_TOKEN")))
        if not list(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").exists():
            folder = Path(snapshot_download(name, allow_patterns=HUB_FILES + [BIN_WEIGHTS],
                                            token=os.environ.get("HF_TOKEN")))
    except Exception as error:
        raise RuntimeError(f"could not download {name} from the Hugging Face hub ({type(error).__name__}: {error}). "
                           "Gated models need HF_TOKEN; without a network, pass a local folder in HF layout "
                           "(config.json, *.safetensors, tokenizer.json)") from error
    return folder


def _read_weights(folder: Path, device) -> dict:
    """All tensors of a checkpoint: model.safetensors, shards listed in model.safetensors.index.json, or
    pytorch_model*.bin converted once to model.safetensors beside them."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif bins := sorted(folder.glob(BIN_WEIGHTS)):
        tensors = {}
        for path in bins:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        with atomic_path(folder / "model.safetensors") as tmp:   # an interruption leaves no half file
            save_file({k: t.contiguous().clone() for k, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
        files = [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(str(path), device=str(device)))
        except Exception as error:   # safetensors raises its own error type for a damaged or empty file
            raise InputError(f"{path}: not a readable safetensors file ({error}); it is damaged or incomplete: "
                             "download or save it again") from None
    return tensors


def source_files(name_or_path: str) -> list[Path]:
    """The files load_model makes a model from: weights, configuration and tokenizer files, and for a LoRA adapter
    its base model's too."""
    folder = resolve(name_or_path)
    files = sorted({path for pattern in HUB_FILES + [BIN_WEIGHTS] for path in folder.glob(pattern)})
    if (folder / "adapter_config.json").exists():
        files += source_files(_read_json(folder / "adapter_config.json")["base_model_name_or_path"])
    return files


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer of an alias, a local folder or a hub id, without its weights."""
    return Tokenizer.from_dir(resolve(name_or_path))


def load_model(name_or_path: str, dtype=torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    """An alias, a local folder or a hub id; a folder with adapter_config.json is its base model plus the adapter,
    merged."""
    folder = resolve(name_or_path)
    if (folder / "adapter_config.json").exists():
        base = _read_json(folder / "adapter_config.json")["base_model_name_or_path"]
        model, tokenizer = load_model(base, dtype, device)
        if (folder / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_dir(folder)
        return merge_lora(load_adapter(model, folder)), tokenizer
    if not (folder / "config.json").exists():
        raise InputError(f"{folder / 'config.json'} not found: a model folder in Hugging Face layout holds "
                         "config.json, *.safetensors and tokenizer.json")
    try:
        args = ModelArgs.from_hf_config(_read_json(folder / "config.json"))
    except InputError as error:
        raise InputError(f"{folder}/{error}") from None
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        model = Transformer(args)
    tensors = {k: v.to(dtype) for k, v in _read_weights(folder, device).items()
               if not k.endswith("rotary_emb.inv_freq")}  # older checkpoints stored RoPE's frequencies, recomputed here
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_tensors(expected, tensors, folder, optional={"lm_head.weight"} if args.tie_word_embeddings else ())
    if args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    # strict=False only for the tied lm_head.weight left out above: _check_tensors has already refused any missing,
    # unexpected or mis-shaped tensor, by name
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model, Tokenizer.from_dir(folder)


def save_model(model: Transformer, tokenizer: Tokenizer, out_dir) -> None:
    """config.json, model.safetensors and tokenizer files, in the layout transformers reads."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_model: the model holds LoRA layers; save_adapter them, or merge_lora first")
    tied = model.args.tie_word_embeddings
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    config = {**model.args.to_hf_config(), "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
              "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_ids, "pad_token_id": tokenizer.pad_id}

    with atomic_files(out_dir) as path:   # all files renamed into place at the end; a run's metrics stay
        path("config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(path("model.safetensors")), metadata={"format": "pt"})
    tokenizer.save(out_dir)


@dataclass
class LoRAConfig:
    r: int = 64                  # rank of the update B·A (Hu et al. 2021, §4)
    alpha: float = 32            # the update is scaled by alpha / r
    dropout: float = 0.1         # dropout on the input of the LoRA branch
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """x -> W0 x + (alpha/r) · B A dropout(x), W0 frozen; A (r, in) kaiming-uniform, B (out, r) zero, so training
    starts from the base model. Attribute names as PEFT's, so the adapter's keys match."""

    def __init__(self, base_layer: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        kw = dict(bias=False, device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, cfg.r, **kw)
        self.lora_B = nn.Linear(cfg.r, base_layer.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scaling = cfg.alpha / cfg.r
        self.merged = False

    def forward(self, x):
        out = self.base_layer(x)
        if self.merged:
            return out
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))  # may be float32 on a bf16 base
        return out + (lora * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha/r) · B A, once; the LoRA branch is then skipped."""
        if not self.merged:
            weight = self.base_layer.weight
            weight += (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(weight.dtype)
            self.merged = True


def _targets(model: nn.Module, cls, names=None):
    """(parent, attribute, module) of every submodule of type cls, named in names when given."""
    return [(parent, attr, child) for parent in list(model.modules()) for attr, child in parent.named_children()
            if isinstance(child, cls) and (names is None or attr in names)]


def apply_lora(model: Transformer, cfg: LoRAConfig) -> Transformer:
    """Freeze every parameter and wrap the target linear layers in LoRALinear."""
    model.requires_grad_(False)
    targets = _targets(model, nn.Linear, cfg.target_modules)
    if not targets:
        raise ValueError(f"apply_lora: no linear layer named any of {cfg.target_modules}")
    for parent, attr, child in targets:
        setattr(parent, attr, LoRALinear(child, cfg))
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Merge every LoRALinear into its base layer and put the plain layer back."""
    for parent, attr, child in _targets(model, LoRALinear):
        child.merge()
        setattr(parent, attr, child.base_layer)
    return model


def _lora_state(model: Transformer) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: Transformer, cfg: LoRAConfig, out_dir, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors in PEFT's layout and key names."""
    tensors = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in _lora_state(model).items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules), "bias": "none",
              "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True}

    with atomic_files(out_dir) as path:
        path("adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(path("adapter_model.safetensors")), metadata={"format": "pt"})


def load_adapter(model: Transformer, adapter_dir) -> Transformer:
    """Wrap model with the LoRA layers of a PEFT-layout folder and load their weights (not merged)."""
    adapter_dir = Path(adapter_dir)
    config = _read_json(adapter_dir / "adapter_config.json")
    if not isinstance(config.get("target_modules"), list) or config.get("use_rslora"):
        raise ValueError(f"{adapter_dir}/adapter_config.json: only a list of target_modules and plain LoRA "
                         "scaling (no use_rslora) are supported")
    cfg = LoRAConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                     target_modules=tuple(config["target_modules"]))
    apply_lora(model, cfg)
    device = model.lm_head.weight.device
    tensors = {k.removeprefix("base_model.model."): v.to(model.lm_head.weight.dtype) for k, v in
               load_file(str(adapter_dir / "adapter_model.safetensors"), device=str(device)).items()}
    expected = {k: v.shape for k, v in _lora_state(model).items()}
    _check_tensors(expected, tensors, adapter_dir / "adapter_model.safetensors")
    model.load_state_dict(tensors, strict=False)   # the base weights are loaded; _check_tensors checked the adapter's
    return model


def main():
    parser = argparse.ArgumentParser(description="Greedy continuation of a prompt")
    parser.add_argument("--model", required=True, help=f"a folder, a hub id or an alias: {sorted(ALIASES)}")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parser.parse_args()
    model, tokenizer = load_model(a.model, getattr(torch, a.dtype), a.device)
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(a.prompt)
    if not prompt:
        raise InputError("--prompt is empty and this tokenizer adds no BOS token: give some text to continue")
    new = generate(model, [prompt], a.max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id)[0]
    print(tokenizer.decode(new))


if __name__ == "__main__":
    run_cli(main)
