"""
The whole model in one file: InternViT (vision) -> MLP connector with pixel shuffle -> Qwen2-style LLM.

This is the architecture of Skywork-R1V3-38B and of the InternVL3 family (RECIPE.md section 1), at any size:
  vision   InternViT: conv patch embedding + CLS + learned positions, pre-norm blocks (LayerNorm or RMSNorm),
           optional QK-norm, layer-scale, GELU MLP. Features from the last layer, CLS dropped.
  connector pixel shuffle (ratio 0.5, InternVL's "v2" order): 1024 patches -> 256 tokens of 4x width, then
           LayerNorm -> Linear -> GELU -> Linear into the LLM's width ("mlp1" in InternVL).
  LLM      Qwen2/2.5 decoder: RMSNorm, RoPE, grouped-query attention with q/k/v bias, SwiGLU MLP;
           optional per-head QK-norm (Qwen3, so InternVL3.5 fits later), tied or untied embeddings.
The tile features overwrite the embeddings of the <IMG_CONTEXT> tokens, in order.

Loading reads both checkpoint layouts found in the wild through an explicit key map that asserts every
tensor is used and every shape matches (STYLE.md rule 4): the transformers-native one (`model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head`) and the original `InternVLChatModel`
one (`vision_model.*` with fused qkv, `mlp1.*`, `language_model.*`). Saving writes the transformers-native
layout, so a trained policy loads in transformers and serving engines.
No training or distributed code lives here.
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class VLMConfig:
    # vision tower (InternViT). Defaults are the tiny VLM of the embedded synthetic task (RECIPE.md section 8).
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


def _chunk_logp_entropy(h, w, tgt, temperature, with_entropy):
    # h (N,C) w (V,C) fp32, tgt (N,). An fp32 lm_head (autocast off: it would round the logits to bf16), the same
    # computation as the sampler's, so the GRPO ratio starts at 1 up to float noise even when the model runs in bf16
    with torch.autocast(h.device.type, enabled=False):
        logits = h.float() @ w.t()  # (N,V) fp32, only this chunk
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
# Entropy is computed WITH gradient (same recomputation, cheap next to the matmul) so the entropy bonus can use it.
# hidden[:, t] predicts targets[:, t]: shift before calling, and slice to the response positions (prompt tokens
# need no log-probs). targets must be valid ids (put a real id, e.g. pad, on masked positions).
# Peak extra memory: the fp32 copy of the (V x C) weight (a no-op for fp32 weights), a few (chunk x V) fp32 tensors
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
    if B * T == 0:
        z = hidden.new_zeros(B, T, dtype=torch.float32)
        return z, (z if with_entropy else None)
    h, tgt, w32 = hidden.reshape(B * T, C), targets.reshape(B * T), weight.float()  # the cast once, not per chunk
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    outs = []
    for i in range(0, B * T, chunk):
        args = (h[i:i + chunk], w32, tgt[i:i + chunk], temperature, with_entropy)
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
                return_hidden=False, targets=None, target_mask=None, dummy_vision=False):
        """
        input_ids (B, T) with the <IMG_CONTEXT> tokens already expanded; pixel_values (N_tiles, 3, H, W) or None
        (or precomputed image_embeds (N_tiles * tokens_per_tile, n_embd)). The tile features overwrite the
        image-token embeddings in row-major order over the batch. cache: a KVCache (see below); the caller
        advances cache.lens afterwards. Returns logits (B, T, vocab); or the final hidden states (B, T, n_embd)
        when return_hidden; or, given targets (B, T) (the token each position predicts), (logp, entropy) of
        shape (B, T) each, computed in chunks so the full fp32 logits never exist (see token_logprobs); with
        target_mask (B, T) only at its positions (0 elsewhere: a prompt's positions need no lm_head).
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
            pos = torch.arange(T, device=x.device)[None].expand(B, T)
            if cache is not None:
                pos = pos + cache.lens[:, None]
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.llm.blocks:
            x = block(x, cos, sin, cache)
        x = self.llm.norm(x)
        if return_hidden:
            return x
        if targets is not None and target_mask is None:
            return token_logprobs(x, self.llm.lm_head.weight, targets)
        if targets is not None:
            sel = target_mask.bool()
            logp, ent = token_logprobs(x[sel][None], self.llm.lm_head.weight, targets[sel][None])
            zeros = x.new_zeros(B, T, dtype=torch.float32)
            return zeros.masked_scatter(sel, logp[0]), zeros.masked_scatter(sel, ent[0])
        return self.llm.lm_head(x)

    # --- Hugging Face checkpoints -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", image_token_id=None):
        """Load a local HF directory (transformers-native or original InternVLChatModel layout, single file or
        sharded). Built on the meta device and given the loaded tensors: one copy in memory, in `dtype`."""
        cfg, layout = load_config(path, image_token_id)
        sd = hf_state_dict(path, cfg, layout, dtype)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(sd, strict=True, assign=True)  # the loaded tensors become the parameters
        model.llm.tie_weights()  # assign replaced the shared parameter: tie again
        return model.to(device)

    def save_pretrained(self, path, state_dict=None, max_shard_bytes=5 * 2**30):
        """Write the transformers-native InternVL layout (config.json + safetensors). state_dict: a full state dict
        of this model (e.g. gathered from FSDP shards); default: this model's own tensors."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        out = {}
        for name, t in sd.items():
            if self.cfg.tie_embeddings and name == "llm.lm_head.weight":
                continue  # tied: transformers re-ties it from the embedding
            hf = hf_names(name, self.cfg, "native")
            parts = t.chunk(len(hf), dim=0) if len(hf) > 1 else [t]  # un-fuse the ViT's qkv
            for n, p in zip(hf, parts):
                out[n] = p.detach().to("cpu").contiguous()
        # shard by size, as transformers does, with an index when there is more than one file
        shards, cur, size = [], {}, 0
        for n, t in out.items():
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[n], size = t, size + nbytes
        shards.append(cur)
        for f in os.listdir(path):  # stale shards of an earlier save would be picked up by loaders
            if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".safetensors.index.json")):
                os.remove(os.path.join(path, f))
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in out.values())
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        dtype = next(iter(out.values())).dtype
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_config(self.cfg, str(dtype).replace("torch.", "")), f, indent=2)


# -----------------------------------------------------------------------------
# A plain static KV cache (one row per sequence): the model's own, for cached-vs-uncached tests and simple decoding.
# The sampler has its own cache with each prompt's K/V stored once for its n samples (sampler.DecodeCache).


class KVCache:
    """Preallocated K/V for all layers: k, v (n_layer, B, n_kv_head, max_len, head_dim); lens (B,) tokens stored
    per row. attend() writes the new k/v of each row at its own position and attends over that row's prefix.
    The caller advances lens after the forward."""

    def __init__(self, cfg, batch_size, max_len, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    def append(self, layer_idx, k, v):  # k, v (B, Hkv, T, hd) -> written at positions lens[b] + t
        B, H, T, D = k.shape
        idx = (self.lens[:, None] + torch.arange(T, device=k.device))[:, None, :, None].expand(B, H, T, D)
        self.k[layer_idx].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer_idx].scatter_(2, idx, v.to(self.v.dtype))

    def attend(self, layer_idx, q, k, v):  # q (B, H, T, hd) -> y (B, H, T, hd)
        self.append(layer_idx, k, v)
        T = q.shape[2]
        L = int(self.lens.max()) + T  # keys beyond the longest row are never needed
        assert L <= self.max_len, f"KV cache overflow: need {L} positions, have {self.max_len}"
        keys, vals = self.k[layer_idx][:, :, :L], self.v[layer_idx][:, :, :L]
        qpos = self.lens[:, None] + torch.arange(T, device=q.device)  # (B, T) absolute positions
        mask = torch.arange(L, device=q.device)[None, None, :] <= qpos[:, :, None]  # (B, T, L) causal + ragged
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask[:, None],
                                           enable_gqa=q.shape[1] != keys.shape[1])
        return y


# -----------------------------------------------------------------------------
# Checkpoint key maps and configs. Rules are applied to OUR parameter names, so every parameter of the model
# has exactly one place in the checkpoint; load_weights then checks the checkpoint holds exactly those tensors.

NATIVE_RULES = [  # (pattern on our name, replacement in the transformers-native layout)
    (r"^vit\.cls$", "model.vision_tower.embeddings.cls_token"),
    (r"^vit\.patch\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vit\.pos$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vit\.blocks\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vit\.blocks\.(\d+)\.attn\.", r"model.vision_tower.encoder.layer.\1.attention."),
    (r"^vit\.blocks\.(\d+)\.ls(\d)$", r"model.vision_tower.encoder.layer.\1.lambda_\2"),
    (r"^vit\.blocks\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vit\.blocks\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vit\.blocks\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^vit\.norm\.", "model.vision_tower.layernorm."),
    (r"^connector\.norm\.", "model.multi_modal_projector.layer_norm."),
    (r"^connector\.fc1\.", "model.multi_modal_projector.linear_1."),
    (r"^connector\.fc2\.", "model.multi_modal_projector.linear_2."),
    (r"^llm\.wte\.", "model.language_model.embed_tokens."),
    (r"^llm\.blocks\.(\d+)\.attn_norm\.", r"model.language_model.layers.\1.input_layernorm."),
    (r"^llm\.blocks\.(\d+)\.mlp_norm\.", r"model.language_model.layers.\1.post_attention_layernorm."),
    (r"^llm\.blocks\.(\d+)\.attn\.", r"model.language_model.layers.\1.self_attn."),
    (r"^llm\.blocks\.(\d+)\.mlp\.", r"model.language_model.layers.\1.mlp."),
    (r"^llm\.norm\.", "model.language_model.norm."),
    (r"^llm\.lm_head\.", "lm_head."),
]
ORIGINAL_RULES = [  # the OpenGVLab InternVLChatModel layout (Skywork-R1V3-38B, InternVL3-*)
    (r"^vit\.cls$", "vision_model.embeddings.class_embedding"),
    (r"^vit\.patch\.", "vision_model.embeddings.patch_embedding."),
    (r"^vit\.pos$", "vision_model.embeddings.position_embedding"),
    (r"^vit\.blocks\.", "vision_model.encoder.layers."),  # block internals share InternViT's names
    (r"^connector\.norm\.", "mlp1.0."),
    (r"^connector\.fc1\.", "mlp1.1."),
    (r"^connector\.fc2\.", "mlp1.3."),
    (r"^llm\.wte\.", "language_model.model.embed_tokens."),
    (r"^llm\.blocks\.(\d+)\.attn_norm\.", r"language_model.model.layers.\1.input_layernorm."),
    (r"^llm\.blocks\.(\d+)\.mlp_norm\.", r"language_model.model.layers.\1.post_attention_layernorm."),
    (r"^llm\.blocks\.(\d+)\.attn\.", r"language_model.model.layers.\1.self_attn."),
    (r"^llm\.blocks\.(\d+)\.mlp\.", r"language_model.model.layers.\1.mlp."),
    (r"^llm\.norm\.", "language_model.model.norm."),
    (r"^llm\.lm_head\.", "language_model.lm_head."),
]
# transformers 4.x saved the -hf repos without the "model." prefix; map those names onto the 5.x ones
LEGACY_NATIVE = [(r"^language_model\.lm_head\.", "lm_head."), (r"^language_model\.model\.", "model.language_model."),
                 (r"^language_model\.", "model.language_model."), (r"^vision_tower\.", "model.vision_tower."),
                 (r"^multi_modal_projector\.", "model.multi_modal_projector.")]


def hf_names(name, cfg, layout):
    """Our parameter name -> its tensor name(s) in a checkpoint; a list of three for the transformers-native
    ViT, which stores q, k and v separately where we (and the original) keep one fused qkv."""
    rules = NATIVE_RULES if layout == "native" else ORIGINAL_RULES
    for pat, rep in rules:
        if re.search(pat, name):
            out = re.sub(pat, rep, name)
            if layout == "native" and re.search(r"attention\.qkv\.", out):
                return [out.replace(".qkv.", f".{p}_proj.") for p in "qkv"]
            return [out]
    raise KeyError(f"no checkpoint name rule for parameter {name}")


def load_config(path, image_token_id=None):
    """config.json of either layout -> (VLMConfig, layout). The original layout also covers Skywork's R1V releases
    (architectures ["SkyworkR1VChatModel"], model_type "skywork_chat"): their modeling code (vLLM's skyworkr1v.py,
    adapted from Skywork's modeling_skywork_chat.py) has the same modules as InternVLChatModel (vision_model = an
    InternVisionModel, mlp1 = Sequential(LayerNorm, Linear, GELU, Linear), language_model = Qwen2ForCausalLM) and
    loads the checkpoint's names onto them unchanged, so ORIGINAL_RULES map both."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json (expected a local Hugging Face model directory)")
    with open(cfg_path) as f:
        c = json.load(f)
    archs = c.get("architectures") or []
    original = (c.get("model_type") in ("internvl_chat", "skywork_chat")
                or any(a in ("InternVLChatModel", "SkyworkR1VChatModel") for a in archs))
    if original:
        v, t = c["vision_config"], c["llm_config"]
        image_size = c.get("force_image_size") or v["image_size"]
        kw = dict(image_size=image_size, patch_size=v["patch_size"], vit_qkv_bias=v.get("qkv_bias", True),
                  vit_qk_norm=v.get("qk_normalization", False), vit_norm=v.get("norm_type", "layer_norm"),
                  vit_eps=v.get("layer_norm_eps", 1e-6), max_tiles=c.get("max_dynamic_patch", 12),
                  use_thumbnail=c.get("use_thumbnail", True), tie_embeddings=t.get("tie_word_embeddings", False))
        if c.get("select_layer", -1) != -1 or c.get("ps_version", "v2") != "v2":
            raise ValueError(f"{cfg_path}: only select_layer=-1 and ps_version='v2' are supported")
        if image_token_id is None:
            image_token_id = _token_id_from_tokenizer(path, "<IMG_CONTEXT>")
    else:
        if c.get("model_type") != "internvl":
            raise ValueError(f"{cfg_path}: model_type {c.get('model_type')!r} is neither 'internvl' "
                             "(transformers-native) nor 'internvl_chat' / 'skywork_chat' (original InternVL layout)")
        v, t = c["vision_config"], c["text_config"]
        size = lambda s: s[0] if isinstance(s, (list, tuple)) else s  # noqa: E731
        tie = c.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        kw = dict(image_size=size(v["image_size"]), patch_size=size(v["patch_size"]),
                  vit_qkv_bias=v.get("attention_bias", False), vit_qk_norm=v.get("use_qk_norm", False),
                  vit_norm=v.get("norm_type", "layer_norm"), vit_eps=v.get("layer_norm_eps", 1e-6),
                  vit_final_norm=not v.get("use_mean_pooling", True), tie_embeddings=tie,
                  **c.get("nanor1v", {}))  # our own extras (tiling) round-trip through this key
        for key, want in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "default"),
                          ("projector_hidden_act", "gelu")):
            if c.get(key, want) != want:
                raise ValueError(f"{cfg_path}: {key}={c[key]!r} is not supported (only {want!r})")
        if image_token_id is None:
            image_token_id = c.get("image_token_id")
    if v.get("hidden_act", "gelu") != "gelu" or t.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{cfg_path}: unsupported activations {v.get('hidden_act')}/{t.get('hidden_act')}")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    # InternVL3 ships rope_scaling {"type": "dynamic", "factor": 2.0} (dynamic NTK). transformers computes its
    # inv_freq with seq_len = max_position_embeddings, where the NTK base factor is (factor - (factor - 1))^... = 1,
    # and recomputes it only for sequences longer than that: up to max_position_embeddings it IS the default RoPE,
    # which is what model.py implements. Longer sequences would differ (generation stays far below 32768).
    if rope_type not in ("default", "dynamic"):
        raise ValueError(f"{cfg_path}: rope scaling {rope} is not supported")
    if image_token_id is None:
        raise ValueError(f"{path}: cannot find the <IMG_CONTEXT> token id; pass image_token_id=")
    llm_qk_norm = t.get("model_type", "qwen2").startswith("qwen3")
    cfg = VLMConfig(
        vit_hidden=v["hidden_size"], vit_layers=v["num_hidden_layers"], vit_heads=v["num_attention_heads"],
        vit_mlp=v["intermediate_size"], downsample_ratio=c.get("downsample_ratio", 0.5),
        vocab_size=t["vocab_size"], n_embd=t["hidden_size"], n_layer=t["num_hidden_layers"],
        n_head=t["num_attention_heads"], n_kv_head=t.get("num_key_value_heads", t["num_attention_heads"]),
        head_dim=t.get("head_dim") or 0, mlp_hidden=t["intermediate_size"], rms_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
        qkv_bias=t.get("attention_bias", not llm_qk_norm), llm_qk_norm=llm_qk_norm,
        max_position_embeddings=t.get("max_position_embeddings", 32768), image_token_id=int(image_token_id), **kw)
    return cfg, "original" if original else "native"


def _token_id_from_tokenizer(path, token):
    # the original layout keeps the <IMG_CONTEXT> id only in the tokenizer files
    for fname, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        p = os.path.join(path, fname)
        if os.path.isfile(p):
            with open(p) as f:
                added = json.load(f).get(key) or {}
            items = added if isinstance(added, list) else [dict(v, id=int(k)) for k, v in added.items()]
            for tok in items:
                if tok.get("content") == token:
                    return int(tok["id"])
    return None


def _open_checkpoint(path, layout):
    """{canonical tensor name: (file, name stored in the file)} over a single model.safetensors or a sharded
    one with an index. transformers 4.x saved the -hf repos under older names: they are mapped onto 5.x's."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            stored = {n: os.path.join(path, fn) for n, fn in json.load(f)["weight_map"].items()}
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
        with safe_open(single, "pt") as f:
            stored = {n: single for n in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    files = {}
    for n, fn in stored.items():
        canon = n
        if layout == "native" and not n.startswith(("model.", "lm_head.")):
            for pat, rep in LEGACY_NATIVE:
                if re.search(pat, n):
                    canon = re.sub(pat, rep, n)
                    break
        files[canon] = (fn, n)
    return files


def hf_state_dict(path, cfg, layout, dtype=torch.float32):
    """Read a checkpoint into a state dict with OUR names (CPU, in `dtype`), through the key map. Any missing,
    unexpected or mis-shaped tensor is an error that names it: a silent partial load is the worst bug this repo
    can have. Fused tensors (the ViT's qkv in the native layout) are concatenated here. Single-process loading;
    FSDP loading reads the same plan one unit at a time (common.build_model)."""
    plan = checkpoint_plan(path, cfg, layout)  # every check that needs no tensor data, before reading any
    sd = read_checkpoint_tensors(plan, [n for n in plan if n != "__head__"], dtype)
    if cfg.tie_embeddings:
        sd["llm.lm_head.weight"] = sd["llm.wte.weight"]
    return sd


def hf_config(cfg, dtype="float32"):
    """VLMConfig -> a transformers-native InternVLConfig dict (loads in InternVLForConditionalGeneration)."""
    text = dict(model_type="qwen3" if cfg.llm_qk_norm else "qwen2", vocab_size=cfg.vocab_size,
                hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_eps,
                rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                attention_bias=cfg.qkv_bias, tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False)
    vision = dict(model_type="internvl_vision", hidden_size=cfg.vit_hidden, num_hidden_layers=cfg.vit_layers,
                  num_attention_heads=cfg.vit_heads, intermediate_size=cfg.vit_mlp, hidden_act="gelu",
                  image_size=[cfg.image_size] * 2, patch_size=[cfg.patch_size] * 2, norm_type=cfg.vit_norm,
                  layer_norm_eps=cfg.vit_eps, use_qk_norm=cfg.vit_qk_norm, attention_bias=cfg.vit_qkv_bias,
                  use_mean_pooling=not cfg.vit_final_norm, layer_scale_init_value=cfg.vit_layer_scale)
    return dict(architectures=["InternVLForConditionalGeneration"], model_type="internvl", dtype=dtype,
                vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
                image_seq_length=cfg.tokens_per_tile, downsample_ratio=cfg.downsample_ratio,
                projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                tie_word_embeddings=cfg.tie_embeddings,
                nanor1v=dict(max_tiles=cfg.max_tiles, use_thumbnail=cfg.use_thumbnail))


def config_from_dict(d):
    known = {f.name for f in fields(VLMConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    return VLMConfig(**d)


# --- loading and saving one piece at a time (FSDP: common.build_model / common.export_hf) ---------------------------


def checkpoint_plan(path, cfg, layout):
    """Match a checkpoint against the model config without reading any tensor data (names and shapes come from the
    safetensors headers): every parameter has its tensor(s), nothing is left over, every shape matches; errors name
    the tensor. Returns {our name: [(file, stored name), ...]} (three parts for the native ViT's q, k, v, in that
    order) plus, when the config ties lm_head but the checkpoint stores it too, "__head__": [(file, stored name)],
    which read_checkpoint_tensors compares with the embedding."""
    from safetensors import safe_open

    files = _open_checkpoint(path, layout)
    with torch.device("meta"):  # shapes only: nothing is allocated
        shapes = {n: p.shape for n, p in VLM(cfg).named_parameters()}  # a tied lm_head appears once (wte)
    wanted = {}  # checkpoint name -> (our name, part index, number of parts)
    for name in shapes:
        hf = hf_names(name, cfg, layout)
        for i, n in enumerate(hf):
            wanted[n] = (name, i, len(hf))
    head = hf_names("llm.lm_head.weight", cfg, layout)[0]
    extra_head = cfg.tie_embeddings and head in files  # tied, but the checkpoint stores lm_head too
    missing = sorted(set(wanted) - set(files))
    unexpected = sorted(files[n][1] for n in set(files) - set(wanted) - ({head} if extra_head else set()))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model config: {len(missing)} missing "
                         f"{missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}")
    plan = {name: [None] * len(hf_names(name, cfg, layout)) for name in shapes}
    by_file = {}
    for n, (fn, stored) in files.items():
        by_file.setdefault(fn, []).append((n, stored))
    for fn, names in by_file.items():
        with safe_open(fn, "pt") as f:
            for n, stored in names:
                got = tuple(f.get_slice(stored).get_shape())
                if n == head and extra_head:
                    expect, plan["__head__"] = tuple(shapes["llm.wte.weight"]), [(fn, stored)]
                else:
                    name, i, k = wanted[n]
                    expect = (shapes[name][0] // k,) + tuple(shapes[name][1:])
                    plan[name][i] = (fn, stored)
                if got != expect:
                    raise ValueError(f"{fn}: tensor {stored} has shape {got}, the model expects {expect} for "
                                     f"{'the tied lm_head' if n == head and extra_head else name}")
    return plan


def read_checkpoint_tensors(plan, names, dtype=None):
    """Read the tensors of our parameters `names` (all of them, or one FSDP unit) through a checkpoint_plan ->
    {name: CPU tensor} in `dtype` (None: as stored). The files are opened for this call only, so their pages leave
    this process's memory map when it returns. A tied config whose checkpoint also stores lm_head: that tensor must
    equal the embedding (checked when "llm.wte.weight" is read)."""
    from safetensors import safe_open

    jobs = {}  # file -> [(our name, part index, stored name)]
    for name in names:
        for i, (fn, stored) in enumerate(plan[name]):
            jobs.setdefault(fn, []).append((name, i, stored))
    check_head = "__head__" in plan and "llm.wte.weight" in names
    if check_head:
        fn, stored = plan["__head__"][0]
        jobs.setdefault(fn, []).append(("__head__", 0, stored))
    parts = {name: [None] * len(plan[name]) for name in list(names) + (["__head__"] if check_head else [])}
    for fn, items in jobs.items():
        with safe_open(fn, "pt") as f:
            for name, i, stored in items:
                parts[name][i] = f.get_tensor(stored)
    if check_head and not torch.equal(parts.pop("__head__")[0], parts["llm.wte.weight"][0]):
        fn, stored = plan["__head__"][0]
        raise ValueError(f"{fn}: {stored} differs from the embedding but the config ties them "
                         "(set tie_word_embeddings=false in config.json)")
    out = {}
    for name in names:
        t = parts.pop(name)
        t = t[0] if len(t) == 1 else torch.cat(t, dim=0)  # the native ViT's q, k, v -> our fused qkv
        out[name] = t if dtype is None else t.to(dtype)
    return out


def hf_export_tensors(cfg, name, t):
    """One of our parameters -> [(name, tensor)] in the transformers-native layout (save_pretrained's names): the
    fused ViT qkv is split into q, k, v; a tied lm_head is not stored (transformers re-ties it)."""
    if cfg.tie_embeddings and name == "llm.lm_head.weight":
        return []
    hf = hf_names(name, cfg, "native")
    parts = t.chunk(len(hf), dim=0) if len(hf) > 1 else [t]
    return [(n, p.contiguous()) for n, p in zip(hf, parts)]


def write_hf_checkpoint(path, cfg, tensors, max_shard_bytes=5 * 2**30):
    """Stream (our name, CPU tensor) pairs into a transformers-native directory: safetensors shards of at most
    max_shard_bytes, written as they fill (memory: one shard + one tensor), then the index and config.json. The
    same files as VLM.save_pretrained. Stale model*.safetensors from an earlier save are removed first."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):  # stale shards of an earlier save would be picked up by loaders
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".safetensors.index.json")):
            os.remove(os.path.join(path, f))
    shard, size, files, weight_map, total, dtype = {}, 0, [], {}, 0, None

    def flush():
        fname = f"model-tmp-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in shard})
        shard.clear()

    for name, t in tensors:
        for n, p in hf_export_tensors(cfg, name, t):
            nbytes = p.numel() * p.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            shard[n], size, total, dtype = p, size + nbytes, total + nbytes, dtype or p.dtype
    if shard or not files:
        flush()
    if len(files) == 1:
        os.replace(os.path.join(path, files[0]), os.path.join(path, "model.safetensors"))
    else:  # final names once the count is known, as transformers names them
        final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
        for f in files:
            os.replace(os.path.join(path, f), os.path.join(path, final[f]))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {n: final[fn] for n, fn in weight_map.items()}}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(cfg, str(dtype).replace("torch.", "")), f, indent=2)
