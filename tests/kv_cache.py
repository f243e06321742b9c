"""A plain static KV cache (one row per sequence) for the cached-vs-uncached tests of model.py: any object with
attend(layer, q, k, v) can be the forward's cache; the sampler has its own (sampler.DecodeCache)."""
import torch
import torch.nn.functional as F


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
