"""Llama-family decoder (Llama 2/3, Mistral without sliding window, Qwen2).

Runs a flattened batch: all scheduled tokens of all sequences in one [tokens, hidden]
tensor, with attention reading and writing the paged KV cache. q/k/v and gate/up are
merged into one matmul each, as checkpoints are loaded.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.attention import AttentionBatch, paged_attention
from workers.layers.linear import Linear
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import ModelConfig
from workers.models.weights import CheckpointFiles, ModelLoadError


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 whatever the model dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv = Linear(cfg.hidden_size, q_size + 2 * kv_size, cfg.qkv_bias, cfg.dtype)
        self.o = Linear(q_size, cfg.hidden_size, cfg.o_bias, cfg.dtype)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, batch, self.scale)
        return self.o(o.flatten(1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, cfg.dtype)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, False, cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, make_mlp: Callable[[ModelConfig], nn.Module]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = make_mlp(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    make_mlp: Callable[[ModelConfig], nn.Module] = MLP

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, type(self).make_mlp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, cfg.dtype,
                              weight=self.embed_tokens if cfg.tie_word_embeddings else None)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, cfg.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                batch: AttentionBatch) -> torch.Tensor:
        """Hidden states [tokens, hidden] after the final norm. kv_caches: [layers, 2, ...]."""
        x = F.embedding(input_ids, self.embed_tokens)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary, kv_cache, batch)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def pack(self) -> None:
        """Lay out every linear weight for the device's fast path, once loaded."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    # -- loading -----------------------------------------------------------------
    def load_weights(self, files: CheckpointFiles) -> None:
        """Copy every tensor from the checkpoint, checking names and shapes."""
        loader = _Loader(files)
        loader.copy(self.embed_tokens, "model.embed_tokens.weight")
        loader.copy(self.norm.weight, "model.norm.weight")
        if not self.cfg.tie_word_embeddings:
            loader.copy(self.lm_head.weight, "lm_head.weight")
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            attn = layer.self_attn
            loader.copy_parts(attn.qkv.weight, [prefix + f"self_attn.{p}_proj.weight" for p in "qkv"], attn.split)
            if attn.qkv.bias is not None:
                loader.copy_parts(attn.qkv.bias, [prefix + f"self_attn.{p}_proj.bias" for p in "qkv"], attn.split)
            loader.copy(attn.o.weight, prefix + "self_attn.o_proj.weight")
            if attn.o.bias is not None:
                loader.copy(attn.o.bias, prefix + "self_attn.o_proj.bias")
            loader.copy(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
            loader.copy(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
            self.load_mlp(loader, layer.mlp, prefix)

    def load_mlp(self, loader: "_Loader", mlp: nn.Module, prefix: str) -> None:
        loader.copy_parts(mlp.gate_up.weight, [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"])
        loader.copy(mlp.down.weight, prefix + "mlp.down_proj.weight")


class _Loader:
    """Copies checkpoint tensors into parameters, naming file and tensor on mismatch."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files

    def copy(self, dest: torch.Tensor, name: str) -> None:
        src = self.files.get(name)
        if tuple(src.shape) != tuple(dest.shape):
            raise ModelLoadError(
                f"tensor {name!r} in {self.files.file_of(name).name} has shape {tuple(src.shape)}, "
                f"expected {tuple(dest.shape)}")
        dest.copy_(src)

    def copy_parts(self, dest: torch.Tensor, names: list[str], sizes: Optional[tuple[int, ...]] = None) -> None:
        """Fill `dest` from several tensors stacked along dim 0 (merged q/k/v, gate/up);
        equal parts unless `sizes` says otherwise."""
        parts = dest.split(list(sizes) if sizes else dest.shape[0] // len(names))
        for part, name in zip(parts, names, strict=True):
            self.copy(part, name)
