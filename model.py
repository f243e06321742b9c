"""
The whole model in one file: InternViT (vision) -> MLP connector with pixel shuffle -> Qwen2-style LLM.

This is the architecture of Skywork-R1V3-38B and of the InternVL3 family (shapes: docs/models.md), at any size:
  vision   InternViT: conv patch embedding + CLS + learned positions, pre-norm blocks (LayerNorm or RMSNorm),
           optional QK-norm, layer-scale, GELU MLP. Features from the last layer, CLS dropped.
  connector pixel shuffle (ratio 0.5, InternVL's "v2" order): 1024 patches -> 256 tokens of 4x width, then
           LayerNorm -> Linear -> GELU -> Linear into the LLM's width ("mlp1" in InternVL).
  LLM      Qwen2/2.5 decoder: RMSNorm, RoPE, grouped-query attention with q/k/v bias, SwiGLU MLP;
           optional per-head QK-norm (Qwen3, so InternVL3.5 fits later), tied or untied embeddings.
The tile features overwrite the embeddings of the <IMG_CONTEXT> tokens, in order.

Loading and saving Hugging Face checkpoints (both layouts, the checked key map) is in plumbing/hf.py. No file I/O,
training or distributed code lives here.
"""
import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class VLMConfig:
    # vision tower (InternViT). Defaults: the tiny VLM of the embedded task (docs/recipe.md, "The embedded default").
    image_size: int = 64
    patch_size: int = 8
    vit_hidden: int = 128
    vit_layers: int = 2
    vit_heads: int = 4
    vit_mlp: int = 512
    vit_norm: str = "layer_norm"  # 'layer_norm' (InternViT-300M) or 'rms_norm' (InternViT-6B)
    vit_eps: float = 1e-6
    vit_qk_norm: bool = False  # InternViT-6B normalises q and k over the full width
    vit_qkv_bias: bool = True
    vit_final_norm: bool = False  # only transformers-native checkpoints with use_mean_pooling=False have one
    vit_layer_scale: float = 0.1  # initial value of ls1/ls2 (checkpoints overwrite it)
    downsample_ratio: float = 0.5
    # language model (Qwen2)
    vocab_size: int = 1024
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 0  # 0 -> n_embd // n_head (Qwen3 sets it explicitly)
    mlp_hidden: int = 768
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    qkv_bias: bool = True  # Qwen2: bias on q/k/v; Qwen3: none
    llm_qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    # the checkpoint's rope_scaling as JSON ('' = none), carried from load to export. Only InternVL3's dynamic NTK
    # ({"type": "dynamic", "factor": 2.0}) is accepted, and it equals plain RoPE up to max_position_embeddings, which
    # is what this model computes (plumbing/hf.py load_config). A string keeps the config hashable.
    rope_scaling: str = ""
    # image tokens and tiling (the processor reads these)
    image_token_id: int = 0
    max_tiles: int = 12
    use_thumbnail: bool = True

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head (GQA)"
        assert self.vit_hidden % self.vit_heads == 0
        assert self.vit_norm in ("layer_norm", "rms_norm"), self.vit_norm

    @property
    def grid(self):  # patches per side of one tile
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self):  # 448/14 = 32 -> 32*32*0.25 = 256
        return int(self.grid**2 * self.downsample_ratio**2)


class RMSNorm(nn.Module):
    # normalise in fp32, scale in the input dtype (as Qwen2 and InternViT do)
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# -----------------------------------------------------------------------------
# Vision: InternViT


class ViTAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.vit_hidden
        self.n_head = cfg.vit_heads
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.vit_qkv_bias)  # fused, as in the original InternViT
        self.proj = nn.Linear(C, C)
        if cfg.vit_qk_norm:  # over the full width, before splitting into heads
            self.q_norm = RMSNorm(C, cfg.vit_eps)
            self.k_norm = RMSNorm(C, cfg.vit_eps)
        self.qk_norm = cfg.vit_qk_norm

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, N, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class ViTMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden, cfg.vit_mlp)
        self.fc2 = nn.Linear(cfg.vit_mlp, cfg.vit_hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def vit_norm(cfg):
    if cfg.vit_norm == "rms_norm":
        return RMSNorm(cfg.vit_hidden, cfg.vit_eps)
    return nn.LayerNorm(cfg.vit_hidden, eps=cfg.vit_eps)


class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = vit_norm(cfg)
        self.attn = ViTAttention(cfg)
        self.norm2 = vit_norm(cfg)
        self.mlp = ViTMLP(cfg)
        self.ls1 = nn.Parameter(torch.full((cfg.vit_hidden,), cfg.vit_layer_scale))  # layer-scale
        self.ls2 = nn.Parameter(torch.full((cfg.vit_hidden,), cfg.vit_layer_scale))

    def forward(self, x):
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.vit_hidden
        self.patch = nn.Conv2d(3, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, C))
        self.pos = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, C))  # CLS + grid*grid patches
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vit_layers)])
        self.norm = vit_norm(cfg) if cfg.vit_final_norm else nn.Identity()

    def pos_embed(self, gh, gw):
        # learned positions for a (gh, gw) patch grid; bicubic interpolation when it differs from training's
        g = self.cfg.grid
        if (gh, gw) == (g, g):
            return self.pos
        cls_pos, patch_pos = self.pos[:, :1], self.pos[:, 1:]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values):  # (N, 3, H, W) -> (N, 1 + H/p * W/p, C)
        x = self.patch(pixel_values.to(self.patch.weight.dtype))  # (N, C, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (N, gh*gw, C)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# -----------------------------------------------------------------------------
# Connector: pixel shuffle + MLP ("mlp1")


def pixel_shuffle(x, r=0.5):
    # InternVL's pixel shuffle, "v2" order. (N, w, h, C) -> (N, w*r, h*r, C/r^2): each output token
    # concatenates a 2x2 neighbourhood of patches. The two permutes reproduce the original memory order exactly.
    N, w, h, C = x.shape
    x = x.reshape(N, w, int(h * r), int(C / r))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(N, int(h * r), int(w * r), int(C / (r * r)))
    return x.permute(0, 2, 1, 3)


class Connector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.r = cfg.downsample_ratio
        C_in = cfg.vit_hidden * int(1 / cfg.downsample_ratio) ** 2  # 3200 * 4 = 12800 for InternViT-6B
        self.norm = nn.LayerNorm(C_in)
        self.fc1 = nn.Linear(C_in, cfg.n_embd)
        self.fc2 = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):  # (N, 1 + P, C_vit) ViT output -> (N, P * r^2, n_embd)
        x = x[:, 1:]  # drop CLS
        N, P, C = x.shape
        g = int(math.isqrt(P))
        assert g * g == P, f"pixel shuffle needs a square patch grid, got {P} patches"
        x = pixel_shuffle(x.reshape(N, g, g, C), self.r)
        x = x.reshape(N, -1, x.shape[-1])
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


# -----------------------------------------------------------------------------
# Language model: Qwen2


def rope_cos_sin(pos, head_dim, theta, dtype):
    # RoPE with the "rotate half" pairing of Qwen2/Llama in HF. pos (B, T) -> cos, sin (B, 1, T, head_dim)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        if cfg.llm_qk_norm:  # Qwen3: per head, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.qk_norm = cfg.llm_qk_norm

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(self.layer_idx, q, k, v)  # writes k, v into the cache, attends over the row's prefix
        else:  # the trainer and the sampler's prefill both attend through SDPA (its flash backend on a GPU)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class LLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie = cfg.tie_embeddings
        self.tie_weights()

    def tie_weights(self):  # call again after to_empty(), which un-ties shared parameters
        if self.tie:
            self.lm_head.weight = self.wte.weight


# The log-prob lm_head: ONE function for the sampler (sampler.prefill / decode / CudaGraphStep: the logits it draws
# from and its log-probs) and the trainer (token_logprobs), so both compute pi(a|s) the same way and the on-policy
# GRPO ratio starts at 1. lm_head_weight(w) prepares the weight once per call (not per chunk or decode step);
# lm_head_logits(h, w) -> (N, V) fp32 logits.
#   CPU (and any device without mm.dtype): fp32 inputs, fp32 matmul (a bf16 weight is copied to fp32 once).
#   CUDA: bf16 inputs, fp32 accumulation and fp32 output, torch.mm(a, b, out_dtype=torch.float32) (aten mm.dtype:
#   torch >= 2.9, CUDA and XPU kernels only; no autograd formula, hence _MMBF16F32's backward). No fp32 copy of the
#   (V, C) weight and bf16 tensor-core speed. For bf16 h and w it is the fp32 product of the same values (a
#   bf16 x bf16 product is exact in fp32), up to the accumulation order. NOT VERIFIED ON A GPU in this repo's CI.
MM_OUT_DTYPE_DEVICES = ("cuda",)


def _mm_out_dtype(device):
    return device.type in MM_OUT_DTYPE_DEVICES


def lm_head_weight(w):
    """lm_head's weight as lm_head_logits wants it: bf16 where mm.dtype runs (a no-op for bf16 weights), else
    fp32 (a no-op for fp32 weights). Differentiable (the cast's gradient reaches w)."""
    return w.to(torch.bfloat16 if _mm_out_dtype(w.device) else torch.float32)


class _MMBF16F32(torch.autograd.Function):
    """h (N, C) @ w (V, C)^T in bf16 with fp32 accumulation and output; backward the same way (the fp32 output's
    gradient rounded to bf16, as an autocast bf16 matmul's is), each gradient in its input's dtype."""

    @staticmethod
    def forward(ctx, h, w):
        h16, w16 = h.to(torch.bfloat16), w.to(torch.bfloat16)
        ctx.save_for_backward(h16, w16)
        ctx.dtypes = (h.dtype, w.dtype)
        return torch.mm(h16, w16.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        h16, w16 = ctx.saved_tensors
        g16 = g.to(torch.bfloat16)
        gh = torch.mm(g16, w16, out_dtype=torch.float32).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g16.t(), h16, out_dtype=torch.float32).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gh, gw


def lm_head_logits(h, w):
    """h (N, C) hidden states (any float dtype), w (V, C) from lm_head_weight -> (N, V) fp32 logits, whether or not
    autocast is on (it would round an fp32 matmul's logits to bf16; it leaves mm.dtype alone: autocast registers
    aten::mm's default overload only, and every other op falls through)."""
    if _mm_out_dtype(h.device):
        return _MMBF16F32.apply(h, w)
    with torch.autocast(h.device.type, enabled=False):
        return h.float() @ w.float().t()  # .float(): a no-op for lm_head_weight's fp32 weight


def _chunk_logp_entropy(h, w, tgt, temperature, with_entropy):
    # h (N,C), w (V,C) from lm_head_weight, tgt (N,). The lm_head is lm_head_logits, the sampler's own, so the GRPO
    # ratio starts at 1 up to float noise even when the model runs in bf16
    logits = lm_head_logits(h, w)  # (N,V) fp32, only this chunk
    if temperature != 1.0:
        logits = logits / temperature
    logq = torch.log_softmax(logits, dim=-1)  # (N,V), one fused kernel forward and backward
    logp = logq.gather(1, tgt[:, None]).squeeze(1)  # (N,)
    if not with_entropy:
        return (logp,)
    # H = -sum_v p_v log p_v; (lse - sum_v p_v z_v) is equal but cancels badly when H is near 0
    ent = -(logq.exp() * logq).sum(-1)  # (N,)
    return logp, ent


# log p(targets) and the full-vocabulary entropy from final hidden states, for the PPO ratio, the entropy bonus
# and logging. The fp32 (tokens x vocab) logits of the whole batch never exist (Qwen's 152k vocab: ~600 KB per
# token): the B*T tokens go through in chunks, and with grad enabled each chunk runs under torch.utils.checkpoint
# (non-reentrant), so autograd stores only the chunk's inputs and backward recomputes the chunk's logits.
# Entropy is computed WITH gradient (same recomputation, cheap next to the matmul) so the entropy bonus can use it;
# a caller that does not use it passes with_entropy=False (no (chunk x V) exp/product/sum, forward nor recompute).
# hidden[:, t] predicts targets[:, t]: shift before calling, and slice to the response positions (prompt tokens
# need no log-probs). targets must be valid ids (put a real id, e.g. pad, on masked positions).
# Peak extra memory: on the CPU the fp32 copy of the (V x C) weight (a no-op for fp32 weights; on CUDA the bf16
# weight is used as it is: lm_head_weight / lm_head_logits), a few (chunk x V) fp32 tensors
# plus, in backward, one transient (V x C) weight-grad per chunk, independent of B*T (bench_logprob.py measures it).
# temperature: divide the logits as the sampler did. Returns logp (B,T) and entropy (B,T) fp32 (None when
# with_entropy=False).
def token_logprobs(hidden, weight, targets, chunk=1024, with_entropy=True, temperature=1.0):
    B, T, C = hidden.shape
    V = weight.shape[0]
    if targets.shape != (B, T) or weight.shape[1] != C:
        raise ValueError(f"model.py token_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)} do not fit (B,T,C), (V,C), (B,T)")
    if targets.numel() and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"model.py token_logprobs: target ids must be in [0, {V}); got min "
                         f"{targets.min().item()} max {targets.max().item()} "
                         "(replace ignore-index padding with a real id and mask it)")
    if B * T == 0:  # still in the graph of hidden and weight (zero gradients): an FSDP rank whose micro-batch is
        # all padding (grpo.py) runs the same backward collectives as the others
        z = hidden.new_zeros(B, T, dtype=torch.float32)
        if torch.is_grad_enabled():
            z = z + 0.0 * (hidden.sum() + weight.sum()).float()
        return z, (z if with_entropy else None)
    # the cast once (fp32 on the CPU, bf16 on CUDA: lm_head_weight), not per chunk
    h, tgt, w = hidden.reshape(B * T, C), targets.reshape(B * T), lm_head_weight(weight)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    outs = []
    for i in range(0, B * T, chunk):
        args = (h[i:i + chunk], w, tgt[i:i + chunk], temperature, with_entropy)
        outs.append(torch.utils.checkpoint.checkpoint(_chunk_logp_entropy, *args, use_reentrant=False)
                    if grad else _chunk_logp_entropy(*args))
    logp = torch.cat([o[0] for o in outs]).view(B, T)
    ent = torch.cat([o[1] for o in outs]).view(B, T) if with_entropy else None
    return logp, ent


# -----------------------------------------------------------------------------
# The VLM


class VLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg)
        self.connector = Connector(cfg)
        self.llm = LLM(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Initialisation for training from scratch (GPT-2 style normal(0, 0.02), zero biases, unit norms,
        layer-scale at its config value). Call again after to_empty() when the model was built on meta."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith(".bias"):
                p.zero_()
            elif re.search(r"norm\d?\.weight$", name):
                p.fill_(1.0)
            elif re.search(r"\.ls\d$", name):
                p.fill_(self.cfg.vit_layer_scale)
            else:
                p.normal_(0.0, std)

    def image_features(self, pixel_values):  # (N_tiles, 3, H, W) -> (N_tiles * tokens_per_tile, n_embd)
        x = self.connector(self.vit(pixel_values))
        return x.reshape(-1, x.shape[-1])

    def forward(self, input_ids, pixel_values=None, *, image_embeds=None, cache=None, pos=None,
                return_hidden=False, targets=None, target_mask=None, dummy_vision=False, with_entropy=True):
        """
        input_ids (B, T) with the <IMG_CONTEXT> tokens already expanded; pixel_values (N_tiles, 3, H, W) or None
        (or precomputed image_embeds (N_tiles * tokens_per_tile, n_embd)). The tile features overwrite the
        image-token embeddings in row-major order over the batch. cache: an object with attend(layer, q, k, v)
        (sampler.DecodeCache; tests/kv_cache.py), with pos the rows' positions (B, T). Returns logits (B, T, vocab);
        or the final hidden states (B, T, n_embd) when return_hidden; or, given targets (B, T) (the token each position predicts), (logp, entropy) of
        shape (B, T) each, computed in chunks so the full fp32 logits never exist (see token_logprobs); with
        target_mask (B, T) only at its positions (0 elsewhere: a prompt's positions need no lm_head).
        with_entropy=False: the entropy is not computed (returned as None), e.g. a loss without an entropy bonus.
        dummy_vision: with no images, still run the vision tower on one blank tile and add 0 x its output, so
        every FSDP rank runs the same collectives whether or not its batch has images.
        """
        B, T = input_ids.shape
        x = self.llm.wte(input_ids)  # (B, T, C)
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.image_features(pixel_values)
        is_img = input_ids == self.cfg.image_token_id
        if image_embeds is not None:
            n_tok, n_feat = int(is_img.sum()), image_embeds.shape[0]
            if n_tok != n_feat:  # the original code silently truncates here; a mismatch is a data bug
                raise ValueError(f"{n_tok} image-context tokens in input_ids but {n_feat} image features "
                                 f"({n_feat // self.cfg.tokens_per_tile} tiles x {self.cfg.tokens_per_tile})")
            x = x.masked_scatter(is_img[..., None], image_embeds.to(x.dtype))
        elif cache is None and bool(is_img.any()):
            raise ValueError("input_ids contain image-context tokens but no pixel_values were given")
        elif dummy_vision:
            s = self.cfg.image_size
            blank = torch.zeros(1, 3, s, s, device=x.device, dtype=x.dtype)
            x = x + 0.0 * self.image_features(blank).sum()
        if pos is None:
            if cache is not None:
                raise ValueError("model.py: a cached forward needs pos, each row's positions (B, T)")
            pos = torch.arange(T, device=x.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.llm.blocks:
            x = block(x, cos, sin, cache)
        x = self.llm.norm(x)
        if return_hidden:
            return x
        if targets is not None and target_mask is None:
            return token_logprobs(x, self.llm.lm_head.weight, targets, with_entropy=with_entropy)
        if targets is not None:
            sel = target_mask.bool()
            logp, ent = token_logprobs(x[sel][None], self.llm.lm_head.weight, targets[sel][None],
                                       with_entropy=with_entropy)
            zeros = x.new_zeros(B, T, dtype=torch.float32)
            return zeros.masked_scatter(sel, logp[0]), None if ent is None else zeros.masked_scatter(sel, ent[0])
        return self.llm.lm_head(x)


def config_from_dict(d):
    """A VLMConfig from its dict (the model_config.json beside every checkpoint), refusing keys it does not know."""
    known = {f.name for f in fields(VLMConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    return VLMConfig(**d)
