"""Llama-family decoder (Llama 2/3, Mistral without sliding window, Qwen2).

Runs a flattened batch: all scheduled tokens of all sequences in one [tokens, hidden]
tensor, with attention reading and writing the paged KV cache. q/k/v and gate/up are
merged into one matmul each, as checkpoints are loaded. Under tensor parallelism
(Megatron-style) each rank holds its slice of heads, MLP width and vocabulary, and
two all-reduces per layer (after o_proj and after down_proj) join the ranks.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.activation import silu_mul
from workers.layers.attention import AttentionBatch, paged_attention
from workers.layers.linear import Linear
from workers.layers.norm import add_rms_norm, rms_norm
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import ModelConfig
from workers.models.weights import CheckpointFiles, ModelLoadError
from workers.parallel.group import TPGroup
from workers.parallel.shards import ShardPlan


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum x + delta, and its norm."""
        return add_rms_norm(x, delta, self.weight, self.eps)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Attention(nn.Module):
    """Column-parallel q/k/v (this rank's heads), row-parallel o_proj (all-reduced)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: ShardPlan) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = plan.q_heads, plan.kv_heads, cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv = Linear(cfg.hidden_size, q_size + 2 * kv_size, cfg.qkv_bias, cfg.dtype)
        # The o_proj bias is added once: by rank 0, before the all-reduce sums the ranks.
        self.o = Linear(q_size, cfg.hidden_size, cfg.o_bias and tp.is_leader, cfg.dtype)
        self.scale = self.head_dim ** -0.5
        # With attention offloading: link.attend for this layer (the KV lives there).
        self.remote: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        return self.tp.all_reduce(self.partial(x, positions, rotary, kv_cache, batch))

    def project(self, x: torch.Tensor, positions: torch.Tensor,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [tokens, heads, head_dim] and k, v [tokens, kv_heads, head_dim], rotary applied."""
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        rotary(positions, q, k)  # in place
        return q, k, v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Attention outputs [tokens, heads, head_dim] through o_proj, summed over the
        ranks (the offloaded forward's second half of a layer's attention)."""
        return self.tp.all_reduce(self.o(o.flatten(1)))

    def partial(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """This rank's heads' share of the output, before the ranks are summed."""
        q, k, v = self.project(x, positions, rotary)
        if self.remote is not None:
            o = self.remote(q, k, v)
        else:
            o = paged_attention(q, k, v, kv_cache, batch, self.scale)
        return self.o(o.flatten(1))


class MLP(nn.Module):
    """SwiGLU feed-forward, down(silu(gate(x)) * up(x)), split on the intermediate dim."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: ShardPlan) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up = Linear(cfg.hidden_size, 2 * plan.intermediate, False, cfg.dtype)
        self.down = Linear(plan.intermediate, cfg.hidden_size, False, cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down(silu_mul(self.gate_up(x))))


MakeMLP = Callable[[ModelConfig, TPGroup, ShardPlan], nn.Module]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: ShardPlan, make_mlp: MakeMLP) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = Attention(cfg, tp, plan)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = make_mlp(cfg, tp, plan)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, batch)
        x, h = self.post_attention_layernorm.add_and_norm(x, attended)
        return x + self.mlp(h)


class LlamaForCausalLM(nn.Module):
    make_mlp: MakeMLP = MLP

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TPGroup()
        self.plan = ShardPlan.for_rank(cfg, self.tp.rank, self.tp.size)
        # Vocab-parallel: each rank holds plan.vocab_shard rows of the embedding and
        # of the LM head (zero padding past the real vocabulary).
        self.embed_tokens = nn.Parameter(torch.zeros(self.plan.vocab_shard, cfg.hidden_size, dtype=cfg.dtype),
                                         requires_grad=False)
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.lm_head = Linear(cfg.hidden_size, self.plan.vocab_shard, False, cfg.dtype,
                              weight=self.embed_tokens if cfg.tie_word_embeddings else None)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, cfg.dtype)

    def offload_attention(self, attend: Callable[..., torch.Tensor]) -> None:
        """Every layer's attention goes to attend(layer, q, k, v) (workers/offload/)."""
        for i, layer in enumerate(self.layers):
            layer.self_attn.remote = functools.partial(attend, i)

    def make_layer(self, index: int) -> nn.Module:
        return DecoderLayer(self.cfg, self.tp, self.plan, type(self).make_mlp)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                batch: AttentionBatch, on_layer: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Hidden states [tokens, hidden] after the final norm. kv_caches: [layers, 2, ...].
        on_layer(i) runs once layer i has written its KV (a handoff reads it meanwhile)."""
        x = self.embed(input_ids)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, positions, self.rotary, kv_cache, batch)
            if on_layer is not None:
                on_layer(i)
        return self.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        # Each rank looks up the ids in its vocabulary slice; the sum fills in the rest.
        local = input_ids - self.plan.vocab_start
        mine = (local >= 0) & (local < self.plan.vocab_shard)
        x = F.embedding(local.clamp(0, self.plan.vocab_shard - 1), self.embed_tokens)
        return self.tp.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(self.lm_head(hidden).float())
        return logits[:, :self.cfg.vocab_size] if self.tp.size > 1 else logits

    def pack(self) -> None:
        """Lay out every linear weight for the device's fast path, once loaded."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    # -- loading: each rank reads only its own slices --------------------------------
    def load_weights(self, files: CheckpointFiles) -> None:
        """Copy every tensor from the checkpoint, checking names and shapes."""
        cfg, plan = self.cfg, self.plan
        loader = _Loader(files)
        loader.copy(self.embed_tokens, "model.embed_tokens.weight", 0, plan.vocab_start, cfg.vocab_size)
        loader.copy(self.norm.weight, "model.norm.weight")
        if not cfg.tie_word_embeddings:
            loader.copy(self.lm_head.weight, "lm_head.weight", 0, plan.vocab_start, cfg.vocab_size)
        d = cfg.head_dim
        qkv_starts = (plan.q_start * d, plan.kv_start * d, plan.kv_start * d)
        qkv_full = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            attn = layer.self_attn
            for kind in ("weight", "bias") if attn.qkv.bias is not None else ("weight",):
                parts = getattr(attn.qkv, kind).split(attn.split)
                for part, p, start, full in zip(parts, "qkv", qkv_starts, qkv_full):
                    loader.copy(part, f"{prefix}self_attn.{p}_proj.{kind}", 0, start, full)
            loader.copy(attn.o.weight, prefix + "self_attn.o_proj.weight", 1, plan.q_start * d, cfg.num_heads * d)
            if attn.o.bias is not None:
                loader.copy(attn.o.bias, prefix + "self_attn.o_proj.bias")
            loader.copy(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
            loader.copy(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
            self.load_mlp(loader, layer.mlp, prefix)

    def load_mlp(self, loader: "_Loader", mlp: nn.Module, prefix: str) -> None:
        start, full = self.plan.intermediate_start, self.cfg.intermediate_size
        gate, up = mlp.gate_up.weight.chunk(2)
        loader.copy(gate, prefix + "mlp.gate_proj.weight", 0, start, full)
        loader.copy(up, prefix + "mlp.up_proj.weight", 0, start, full)
        loader.copy(mlp.down.weight, prefix + "mlp.down_proj.weight", 1, start, full)


class _Loader:
    """Copies checkpoint tensors, or one rank's slice of them, into parameters, naming
    file and tensor on mismatch."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files

    def copy(self, dest: torch.Tensor, name: str, dim: Optional[int] = None, start: int = 0,
             full: Optional[int] = None) -> None:
        """dest ← the tensor, or its slice [start, start + dest.shape[dim]) along `dim`
        of a tensor whose full size there is `full` (rows past it stay as they are:
        vocabulary padding)."""
        expected = list(dest.shape)
        if dim is not None:
            expected[dim] = full
        found = self.files.shape(name)
        if tuple(found) != tuple(expected):
            raise ModelLoadError(
                f"tensor {name!r} in {self.files.file_of(name).name} has shape {tuple(found)}, "
                f"expected {tuple(expected)}")
        if dim is None:
            dest.copy_(self.files.get(name))
            return
        stop = min(start + dest.shape[dim], full)
        if stop <= start:
            return  # this rank's vocabulary slice is all padding
        dest.narrow(dim, 0, stop - start).copy_(self.files.get_slice(name, dim, start, stop))
