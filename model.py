"""The decoder CAT tunes (Llama, Qwen2, Mistral), written out, as nanoGPT's model.py reads:

  ModelArgs            the hyper-parameters, read from a Hugging Face config.json
  RMSNorm, RoPE, MLP   the Llama block's parts (SwiGLU, split-halves rotary embedding, Llama-3 scaling)
  Attention            softmax(QKᵀ/√d_k)·V (CAT §3.1), written out when CAT reads the maps (Eq. 7), else the fused
                       kernel plus causal_mass: the attention mass on the causal tokens of the rows that hold them,
                       all the fast path of Eq. 8-9 needs (cat.mass_sums)
  Transformer          embeddings -> blocks -> norm -> lm_head; logits at chosen positions only
  generate, KVCache    batched greedy decoding with a key/value cache
  LoRALinear           hand-written LoRA (Hu et al. 2021): W0 x + (alpha/r)·B A x, PEFT's parameter names
Files (config.json, safetensors, tokenizers, adapters, the hub) are hf.py's."""
import contextlib
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import ArgumentParser, InputError, check_device, resolve_device, run_cli

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_KEYS = {"default": (), "linear": ("factor",),                          # what rope_frequencies reads of each type
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


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
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise InputError(f"config.json: no {', '.join(missing)}: a Llama, Qwen2 or Mistral config.json has them")
        for key in (*required, "num_key_value_heads", "head_dim"):   # these two may be null: derived below
            value = cfg.get(key)   # one of another kind fails deep inside torch, 0 heads as a division by zero
            if key in cfg and not (value is None and key not in required) and \
                    not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise InputError(f"config.json: {key} is {json.dumps(value)}, where a size (a whole number, 1 or "
                                 "more) belongs; restore the file from the model's source")
        numbers = {"rms_norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": theta,
                   **{f"rope_scaling's {key}": rope.get(key) for key in ROPE_KEYS[rope_type]}}
        for key, value in numbers.items():   # a string here fails deep inside torch, a missing factor as a KeyError
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise InputError(f"config.json: {key} is {'missing' if value is None else json.dumps(value)}, where "
                                 "a positive number belongs; restore the file from the model's source")
        for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):   # "false" would read as true
            if cfg.get(key) is not None and not isinstance(cfg[key], bool):
                raise InputError(f"config.json: {key} is {json.dumps(cfg[key])}, where true or false belongs; "
                                 "restore the file from the model's source")
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
    attentions: list[torch.Tensor] | None       # per layer, what CAT reads (cat.average_attention, Eq. 7): the
                                                # softmax probabilities (B, H, T, S), float32 (return_attn), or the
                                                # causal rows' mass m_i = sum_j P_ij A_adj[i, j] (B, H, R)
                                                # (causal_rows); else None
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
        """x (B, T, dim); visible (B, 1, T, S) bool, True = query i may attend to key j, or None = j <= i (S == T).
        Returns the output (B, T, dim) and what CAT reads of the attention: the probabilities (B, H, T, S) with
        return_attn; with causal_rows (B, R) and causal_row_mask (B, R, S), the rows of the CAT mask that hold
        causal tokens, their causal mass (B, H, R) (causal_mass); else None."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, D).transpose(1, 2)       # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)    # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)    # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                             # (B, H_kv, S, D)
        n_rep = self.n_heads // self.n_kv_heads   # grouped-query attention: kv head g serves n_rep query heads
        for_cat = None
        if return_attn:  # Eq. 1 written out: Z = softmax(Q Kᵀ / √d_k) · V, the map kept for Eq. 7
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)   # (B, H, S, D)
            S = k.shape[2]
            # Eq. 5: the lower-triangular map, j <= i (offset by the cached positions), or the padding-aware mask
            allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T) if visible is None else visible
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(D)         # (B, H, T, S)
            for_cat = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)   # float32 attention map
            out = for_cat.to(v.dtype) @ v                                     # (B, H, T, D)
        else:            # the same, fused, without forming the map
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None,
                                                 enable_gqa=n_rep > 1)
            if causal_rows is not None:
                for_cat = self.causal_mass(q, k.repeat_interleave(n_rep, dim=1), visible, causal_rows,
                                           causal_row_mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * D)             # Eq. 2: Concat(Z_1, ..., Z_h)
        return self.o_proj(out), for_cat                                      # ... · W_O

    def causal_mass(self, q, k_all, visible, causal_rows, causal_row_mask):
        """CAT §4.2's fast path (docs/design.md, "Speed"): the loss reads, of the attention map, only the rows that
        hold causal tokens, and of each such row only m_i = sum_j P_ij A_adj[i, j]. So Eq. 1's softmax is written out
        for those R rows alone, (R × S) a head instead of (T × S), beside the fused call. Returns m (B, H, R)."""
        B, H, _, D = q.shape
        S, R = k_all.shape[2], causal_rows.shape[1]
        q_rows = q.gather(2, causal_rows[:, None, :, None].expand(B, H, R, D))       # (B, H, R, D)
        scores = (q_rows @ k_all.transpose(-2, -1)).float() / math.sqrt(D)          # (B, H, R, S)
        if visible is None:                                                          # j <= i
            row_visible = (torch.arange(S, device=q.device) <= causal_rows[..., None])[:, None]   # (B, 1, R, S)
        else:
            row_visible = visible.gather(2, causal_rows[:, None, :, None].expand(-1, 1, -1, S))
        p_rows = scores.masked_fill(~row_visible, float("-inf")).softmax(dim=-1)
        return (p_rows * causal_row_mask[:, None]).sum(-1)                          # (B, H, R)


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
        h, for_cat = self.self_attn(self.input_layernorm(x), cos, sin, visible, cache=cache, return_attn=return_attn,
                                    causal_rows=causal_rows, causal_row_mask=causal_row_mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), for_cat


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
        that hold causal tokens (cat.causal_rows), to return each layer's causal mass of those rows (B, H, R) in
        attentions (return_attn: each layer's map); logits_at (N,) long, flat
        positions b·T + t: logits there only, (N, V), as L_next reads them; last_only: logits of the last
        position only, (B, 1, V), as generation needs."""
        B, T = input_ids.shape
        past = cache.length() if cache is not None else 0
        S = past + T
        if self.args.sliding_window is not None and S > self.args.sliding_window:
            raise ValueError(f"{S} tokens exceed the sliding window ({self.args.sliding_window}), not implemented")
        if causal_rows is not None and (past or return_attn):
            raise ValueError("causal_rows needs the whole sequence in one call, without a KV cache or return_attn")
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
        attentions = []
        for layer in self.model.layers:
            x, for_cat = layer(x, cos, sin, visible, cache, return_attn, causal_rows, causal_row_mask)
            attentions.append(for_cat)
        if logits_at is not None:
            x = x.flatten(0, 1).index_select(0, logits_at)                    # (N, dim): the loss positions only
        elif last_only:
            x = x[:, -1:]                                                     # (B, 1, dim)
        logits = self.lm_head(self.model.norm(x))                             # (B, T, V), (N, V) or (B, 1, V)
        return ModelOutput(logits=logits, attentions=attentions if return_attn or causal_rows is not None else None,
                           cache=cache)


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


def main():
    import hf   # the files of a model folder (hf.py imports this module)
    parser = ArgumentParser(description="Greedy continuation of a prompt")
    parser.add_argument("--model", required=True, help=f"a folder, a hub id or an alias: {sorted(hf.ALIASES)}")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    a = parser.parse_args()
    if a.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    check_device(a.device)   # else safetensors, reading the weights onto it, fails as if the file were damaged
    a.device = resolve_device(a.device)
    model, tokenizer = hf.load_model(a.model, getattr(torch, a.dtype), a.device)
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(a.prompt)
    if not prompt:
        raise InputError("--prompt is empty and this tokenizer adds no BOS token: give some text to continue")
    new = generate(model, [prompt], a.max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id)[0]
    print(tokenizer.decode(new))


if __name__ == "__main__":
    run_cli(main)
