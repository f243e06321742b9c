"""
model.py against references no one here wrote: transformers' InternVLForConditionalGeneration (tiny, random,
built from config objects) and the OpenGVLab InternVLChatModel checkpoint layout (written from it by
hf_fixtures.write_original_layout). fp32 on CPU; parity means max|ours - ref| / max|ref| <= 1e-4.

    pytest -q tests/test_model.py --durations=5
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from hf_fixtures import (IMG_CONTEXT_ID, N_REGULAR, ROPE_THETA, TOKENS_PER_TILE, hf_logits, make_batch,
                         make_hf_model, original_config, original_state_dict, rel_err, write_original_layout)
from kv_cache import KVCache
from plumbing.hf import load_pretrained, save_pretrained

TOL = 1e-4
# the model variants of the parity matrix: InternViT-300M-like (LayerNorm, qkv bias, untied LLM as in
# Qwen2.5-32B) and InternViT-6B-like (RMSNorm, QK-norm, no qkv bias, tied LLM as in Qwen2.5-0.5B)
VARIANTS = {
    "ln_untied": dict(tie=False, vit_norm="layer_norm", vit_qk_norm=False, qkv_bias=True),
    "rms_qknorm_tied": dict(tie=True, vit_norm="rms_norm", vit_qk_norm=True, qkv_bias=False),
    "ln_qknorm_tied": dict(tie=True, vit_norm="layer_norm", vit_qk_norm=True, qkv_bias=True),
}
TILES = [1, 0, 3]  # one batch: a 1-tile image, a text-only row, a 3-tile image


def logits_of(out):
    # the contract allows logits alone or first in a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def ours(model, ids, pv=None, cache=None, **kw):
    if cache is not None:  # a cached forward: each row's positions continue where its cache ends
        kw["pos"] = cache.lens[:, None] + torch.arange(ids.shape[1])
    return logits_of(model(ids, pv, cache=cache, **kw)).float()


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("untied"), seed=1, **VARIANTS["ln_untied"])


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("tied"), seed=2, **VARIANTS["rms_qknorm_tied"])


# -----------------------------------------------------------------------------
# the fixtures themselves: the original-layout writer must reproduce the original InternVL computation


def original_image_features(sd, ocfg, pv):
    """extract_feature() of OpenGVLab's InternVLChatModel (modeling_internvl_chat.py + modeling_intern_vit.py,
    naive attention path), written out on the original state dict: pv (N,3,H,W) -> (N, tokens, n_embd)."""
    vc = ocfg["vision_config"]
    C, H, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]

    def norm(x, pre):
        if vc["norm_type"] == "rms_norm":
            return sd[pre + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return F.layer_norm(x, (C,), sd[pre + ".weight"], sd[pre + ".bias"], eps)

    x = F.conv2d(pv, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=vc["patch_size"])
    x = x.flatten(2).transpose(1, 2)  # (N, P, C)
    cls = sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["vision_model.embeddings.position_embedding"]
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        B, N, _ = x.shape
        qkv = F.linear(norm(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        if vc["qk_normalization"]:  # RMSNorm over the full width, all heads together
            rms = lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
            q = rms(q.transpose(1, 2).flatten(-2), sd[p + "attn.q_norm.weight"]).view(B, N, H, -1).transpose(1, 2)
            k = rms(k.transpose(1, 2).flatten(-2), sd[p + "attn.k_norm.weight"]).view(B, N, H, -1).transpose(1, 2)
        att = ((q * (C // H) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = F.linear((att @ v).transpose(1, 2).reshape(B, N, C), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + y * sd[p + "ls1"]
        h = F.gelu(F.linear(norm(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
    x = x[:, 1:]  # drop CLS
    n, s = x.shape[0], int(x.shape[1] ** 0.5)
    x = x.reshape(n, s, s, C)
    # pixel_shuffle, ps_version 'v2', scale 0.5
    x = x.view(n, s, s // 2, C * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, s // 2, s // 2, C * 4).permute(0, 2, 1, 3).contiguous().reshape(n, -1, C * 4)
    x = F.layer_norm(x, (C * 4,), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])
    return x


@pytest.mark.parametrize("variant", ["ln_untied", "rms_qknorm_tied"])
@torch.no_grad()
def test_original_layout_writer_matches_original_code(tmp_path, variant):
    hf, _ = make_hf_model(tmp_path, seed=3, **VARIANTS[variant])
    _, pv = make_batch([2], T=16)
    ref = hf.model.get_image_features(pixel_values=pv).pooler_output  # (N, 4, n_embd)
    got = original_image_features(original_state_dict(hf), original_config(hf), pv)
    assert rel_err(got, ref) <= 1e-5


# -----------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_parity_with_transformers(tmp_path, variant):
    hf, d = make_hf_model(tmp_path, seed=4, **VARIANTS[variant])
    model = load_pretrained(d).eval()
    cfg = model.cfg
    assert (cfg.tokens_per_tile, cfg.image_token_id) == (TOKENS_PER_TILE, IMG_CONTEXT_ID)
    assert cfg.rope_theta == ROPE_THETA
    assert (model.llm.lm_head.weight is model.llm.wte.weight) == VARIANTS[variant]["tie"]
    ids, pv = make_batch(TILES, T=24, seed=5)
    # vision tower + connector alone, so a failure says which half is wrong
    ref_feat = hf.model.get_image_features(pixel_values=pv).pooler_output
    feat = model.image_features(pv)
    assert feat.shape == (sum(TILES) * TOKENS_PER_TILE, cfg.n_embd)
    assert rel_err(feat, ref_feat.reshape(feat.shape)) <= TOL
    # images in some rows, several tiles per image
    assert rel_err(ours(model, ids, pv), hf_logits(hf, ids, pv)) <= TOL
    # text only
    text = torch.randint(0, N_REGULAR, (2, 17), generator=torch.Generator().manual_seed(6))
    assert rel_err(ours(model, text), hf_logits(hf, text)) <= TOL
    # final hidden state (after the final norm) == transformers' last_hidden_state
    h = model(ids, pv, return_hidden=True)
    assert rel_err(h, hf.model(input_ids=ids, pixel_values=pv).last_hidden_state) <= TOL


@torch.no_grad()
def test_vit_position_embedding_interpolation(hf_tied):
    """Tiles of another size than the checkpoint's (42 px -> a 6x6 patch grid, 9 tokens per tile): the learned
    position embedding is resized bicubically, as in transformers and the original InternViT."""
    hf, d = hf_tied
    model = load_pretrained(d).eval()
    pv = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(18))
    ref = hf.model.get_image_features(pixel_values=pv).pooler_output  # (2, 9, n_embd)
    assert ref.shape[1] == 9
    assert rel_err(model.image_features(pv), ref.reshape(-1, ref.shape[-1])) <= TOL


@torch.no_grad()
def test_explicit_positions_match_transformers(hf_untied):
    hf, d = hf_untied
    model = load_pretrained(d).eval()
    text = torch.randint(0, N_REGULAR, (2, 9), generator=torch.Generator().manual_seed(7))
    # RoPE sees only relative positions, so give the rows gaps (as after left-trimmed or packed prompts)
    t = torch.arange(9)[None]
    pos = torch.cat([t + 3 * (t >= 4), t * 2 + 5])  # (2, 9)
    ref = hf(input_ids=text, position_ids=pos).logits
    assert rel_err(ours(model, text, pos=pos), ref) <= TOL
    assert rel_err(ours(model, text), ref) > 10 * TOL  # the positions really reach RoPE


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_save_pretrained_loads_in_transformers(tmp_path, hf_untied, hf_tied, tie):
    from transformers import InternVLForConditionalGeneration
    hf, d = hf_tied if tie else hf_untied
    model = load_pretrained(d).eval()
    out = str(tmp_path / "ours")
    save_pretrained(model, out)
    hf2, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    hf2 = hf2.float().eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf2.config.image_token_id == IMG_CONTEXT_ID
    assert bool(hf2.config.tie_word_embeddings) == tie
    ids, pv = make_batch(TILES, T=24, seed=8)
    ref = hf_logits(hf, ids, pv)
    assert rel_err(hf_logits(hf2, ids, pv), ref) <= TOL
    assert rel_err(ours(load_pretrained(out).eval(), ids, pv), ref) <= TOL  # and back into ours


@torch.no_grad()
def test_native_sharded(tmp_path, hf_untied):
    hf, _ = hf_untied
    d = str(tmp_path / "sharded")
    hf.save_pretrained(d, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    ids, pv = make_batch(TILES, T=24, seed=9)
    assert rel_err(ours(load_pretrained(d).eval(), ids, pv), hf_logits(hf, ids, pv)) <= TOL


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_native_prefixed_names(tmp_path, hf_untied, hf_tied, tie):
    """transformers 5.x save_pretrained writes the hub's pre-5.x names (vision_tower.*, language_model.model.*,
    language_model.lm_head.*; save_original_format=True), which the fixtures' directories hold. The in-memory
    5.x names (model.vision_tower.*, model.language_model.*, lm_head.*) are also a valid checkpoint: write
    those by hand, with a transformers-4.x style text_config (rope_theta at top level)."""
    from transformers import InternVLForConditionalGeneration
    hf, src = hf_tied if tie else hf_untied
    d = str(tmp_path / "prefixed")
    os.makedirs(d)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert any(k.startswith("model.vision_tower.") for k in sd)
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    tc = c["text_config"]
    tc["rope_theta"] = tc.pop("rope_parameters")["rope_theta"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    hf2, info = InternVLForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # transformers takes these names too
    ids, pv = make_batch(TILES, T=24, seed=9)
    ref = hf_logits(hf, ids, pv)
    assert rel_err(hf_logits(hf2.float().eval(), ids, pv), ref) <= TOL
    model = load_pretrained(d).eval()
    assert model.cfg.rope_theta == ROPE_THETA
    assert rel_err(ours(model, ids, pv), ref) <= TOL


# -----------------------------------------------------------------------------
# the original InternVLChatModel layout (Skywork-R1V3-38B, OpenGVLab/InternVL3-*)


@pytest.mark.parametrize("variant,sharded", [("ln_untied", False), ("rms_qknorm_tied", True),
                                             ("ln_untied", True)])
@torch.no_grad()
def test_original_layout_parity(tmp_path, hf_untied, hf_tied, variant, sharded):
    hf, _ = hf_untied if variant == "ln_untied" else hf_tied
    d = write_original_layout(hf, str(tmp_path / "orig"), sharded=sharded)
    model = load_pretrained(d).eval()
    assert model.cfg.image_token_id == IMG_CONTEXT_ID  # read from the tokenizer files
    assert model.cfg.rope_theta == ROPE_THETA
    assert (model.llm.lm_head.weight is model.llm.wte.weight) == VARIANTS[variant]["tie"]
    ids, pv = make_batch(TILES, T=24, seed=10)
    assert rel_err(ours(model, ids, pv), hf_logits(hf, ids, pv)) <= TOL
    text = torch.randint(0, N_REGULAR, (1, 11), generator=torch.Generator().manual_seed(11))
    assert rel_err(ours(model, text), hf_logits(hf, text)) <= TOL


@torch.no_grad()
def test_original_layout_needs_image_token_id(tmp_path, hf_untied):
    hf, _ = hf_untied
    d = write_original_layout(hf, str(tmp_path / "orig"), tokenizer=False)
    with pytest.raises(Exception) as e:  # no tokenizer files and no id given: say what is missing
        load_pretrained(d)
    assert "image_token_id" in str(e.value) or "IMG_CONTEXT" in str(e.value), str(e.value)
    model = load_pretrained(d, image_token_id=IMG_CONTEXT_ID).eval()
    ids, pv = make_batch([2, 1], T=16, seed=12)
    assert rel_err(ours(model, ids, pv), hf_logits(hf, ids, pv)) <= TOL


# -----------------------------------------------------------------------------
# strict loading: every tensor used, every shape checked, errors name the tensor


def copy_with_state_dict(src, dst, edit):
    """Copy checkpoint dir src to dst with its single model.safetensors edited by edit(sd) -> name."""
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    name = edit(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return name


def find(sd, suffix):
    hits = [k for k in sd if k.endswith(suffix)]
    assert len(hits) == 1, f"{suffix}: {hits}"
    return hits[0]


def drop(suffix):
    def edit(sd):
        key = find(sd, suffix)
        del sd[key]
        return key
    return edit


def extra(key):
    def edit(sd):
        sd[key] = torch.zeros(3)
        return key
    return edit


def reshape(suffix):
    def edit(sd):
        key = find(sd, suffix)
        t = sd[key]
        sd[key] = torch.zeros(t.shape[0] + 1, *t.shape[1:])
        return key
    return edit


# names as the fixture wrote them: by suffix, since transformers' on-disk names vary with its version
NATIVE_EDITS = {
    "missing_llm": drop("layers.1.mlp.up_proj.weight"),
    "missing_vit_k": drop("vision_tower.encoder.layer.0.attention.k_proj.weight"),
    "missing_lm_head": drop("lm_head.weight"),
    "extra": extra("language_model.model.layers.0.self_attn.rotary.inv_freq"),
    "misshaped_connector": reshape("multi_modal_projector.linear_1.weight"),
    "misshaped_vit_bias": reshape("vision_tower.encoder.layer.1.attention.v_proj.bias"),
}
ORIGINAL_EDITS = {
    "missing_qkv": drop("vision_model.encoder.layers.1.attn.qkv.bias"),
    "missing_ls": drop("vision_model.encoder.layers.0.ls2"),
    "extra": extra("vision_model.encoder.layers.0.attn.qkv.lora_A"),
    "misshaped_mlp1": reshape("mlp1.3.bias"),
    "misshaped_llm": reshape("language_model.model.layers.0.self_attn.o_proj.weight"),
}


def native_5x_name(k):
    """Pre-5.x -hf name -> transformers 5.x name (the "llava" renames in transformers' conversion_mapping.py)."""
    for a, b in [("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]:
        if k.startswith(a):
            return b + k[len(a):]
    return k


@pytest.mark.parametrize("edit", list(NATIVE_EDITS))
def test_native_checkpoint_errors_name_the_tensor(tmp_path, hf_untied, edit):
    _, d = hf_untied
    name = copy_with_state_dict(d, str(tmp_path / "bad"), NATIVE_EDITS[edit])
    with pytest.raises(Exception) as e:
        load_pretrained(str(tmp_path / "bad"))
    # a missing tensor may be named in either naming of the layout; an unexpected one as the file stores it
    names = [name] if edit == "extra" else [name, native_5x_name(name)]
    assert any(n in str(e.value) for n in names), f"error does not name {names}: {e.value!r}"


@pytest.mark.parametrize("edit", list(ORIGINAL_EDITS))
def test_original_checkpoint_errors_name_the_tensor(tmp_path, hf_untied, edit):
    hf, _ = hf_untied
    d = write_original_layout(hf, str(tmp_path / "orig"))
    name = copy_with_state_dict(d, str(tmp_path / "bad"), ORIGINAL_EDITS[edit])
    with pytest.raises(Exception) as e:
        load_pretrained(str(tmp_path / "bad"))
    assert name in str(e.value), f"error does not name {name}: {e.value!r}"


@torch.no_grad()
def test_image_token_count_mismatch_raises(hf_untied):
    _, d = hf_untied
    model = load_pretrained(d).eval()
    ids, pv = make_batch([1, 2], T=20, seed=13)
    good = ours(model, ids, pv)  # the well-formed batch runs; precomputed features give the same logits
    assert rel_err(ours(model, ids, image_embeds=model.image_features(pv)), good) <= 1e-6
    with pytest.raises(ValueError):  # one tile too few
        model(ids, pv[:2])
    with pytest.raises(ValueError):  # one image token too many
        bad = ids.clone()
        bad[0, -1] = IMG_CONTEXT_ID
        model(bad, pv)
    with pytest.raises(ValueError):  # one image token too few
        bad = ids.clone()
        bad[1, (bad[1] == IMG_CONTEXT_ID).nonzero()[0]] = 5
        model(bad, pv)
    with pytest.raises(ValueError):  # image tokens but no pixels
        model(ids)


# -----------------------------------------------------------------------------
# KV cache: a prompt fed in chunks (the caller advancing lens) gives the uncached logits


@torch.no_grad()
def test_kv_cache_chunks_equal_uncached(hf_tied):
    _, d = hf_tied
    model = load_pretrained(d).eval()
    ids, pv = make_batch([1, 2], T=20, seed=14)  # image spans end by position 13
    full = ours(model, ids, pv)
    cache = KVCache(model.cfg, 2, 32, torch.float32, "cpu")
    T1 = 14
    parts = [ours(model, ids[:, :T1], pv, cache=cache)]
    assert cache.lens.tolist() == [0, 0], "forward must not advance cache.lens"
    cache.lens += T1
    parts.append(ours(model, ids[:, T1:17], cache=cache))  # a multi-token chunk
    cache.lens += 3
    for t in range(17, 20):  # then one token at a time (the decode path)
        parts.append(ours(model, ids[:, t:t + 1], cache=cache))
        cache.lens += 1
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


@torch.no_grad()
def test_kv_cache_ragged_rows(hf_untied):
    """Rows at different lengths in one cache: row 1 keeps only 8 of its 12 prefilled tokens, so positions
    8..11 hold stale keys; the next chunk must overwrite/ignore them and use each row's own positions."""
    _, d = hf_untied
    model = load_pretrained(d).eval()
    ids, pv = make_batch([1, 1], T=12, seed=15)  # image spans: row 0 at 1..6, row 1 at 2..7
    nxt = torch.randint(0, N_REGULAR, (2, 3), generator=torch.Generator().manual_seed(16))
    lens = [12, 8]
    cache = KVCache(model.cfg, 2, 24, torch.float32, "cpu")
    first = ours(model, ids, pv, cache=cache)
    cache.lens += torch.tensor(lens)
    second = ours(model, nxt, cache=cache)
    cache.lens += 3
    third = ours(model, nxt[:, :1], cache=cache)  # one more decode step at ragged positions
    for b, L in enumerate(lens):
        seq = torch.cat([ids[b, :L], nxt[b], nxt[b, :1]])[None]
        ref = ours(model, seq, pv[b:b + 1])
        assert rel_err(first[b, :L], ref[0, :L]) <= 1e-5
        assert rel_err(second[b], ref[0, L:L + 3]) <= 1e-5
        assert rel_err(third[b], ref[0, L + 3:]) <= 1e-5


# -----------------------------------------------------------------------------
# loading into an empty model


class RandomInitBytes(TorchDispatchMode):
    """Counts bytes of real (non-meta) memory filled by random-init ops: a model built on the CPU and then
    overwritten by the checkpoint runs these over every weight; one built on meta and filled does not."""
    RANDOM = {"normal_", "uniform_", "randn", "rand", "normal", "bernoulli_", "random_", "exponential_", "randint"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket.__name__ in self.RANDOM and isinstance(out, torch.Tensor) and not out.is_meta:
            self.bytes += out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_from_pretrained_fills_an_empty_model(hf_tied, dtype):
    hf, d = hf_tied
    with RandomInitBytes() as counter:
        model = load_pretrained(d, device="cpu", dtype=dtype).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert counter.bytes < 0.05 * n_bytes, f"{counter.bytes} bytes randomly initialised for a {n_bytes}-byte model"
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta and t.device.type == "cpu", f"{name} left on {t.device}"
        if t.is_floating_point() and name in dict(model.named_parameters()):
            assert t.dtype == dtype, f"{name} is {t.dtype}, asked for {dtype}"
    assert model.llm.lm_head.weight is model.llm.wte.weight  # still tied after filling
    ids, pv = make_batch(TILES, T=24, seed=17)
    err = rel_err(ours(model, ids, pv.to(dtype)), hf_logits(hf, ids, pv))
    assert err <= (TOL if dtype == torch.float32 else 5e-2), err


def test_cached_forward_needs_positions(hf_tied):
    # without pos a cached forward would put every row's new tokens at positions 0..T-1: refused
    model = load_pretrained(hf_tied[1]).eval()
    ids, _ = make_batch([0, 0], T=4, seed=3)
    with pytest.raises(ValueError, match="cached forward needs pos"):
        model(ids, cache=KVCache(model.cfg, 2, 8, torch.float32, "cpu"))


def test_empty_logprob_selection_stays_in_the_graph():
    # an all-padding micro-batch (grpo.py): zero log-probs, but with grad on, zero gradients reach the hidden
    # states and lm_head, so every FSDP rank runs the same backward; under no_grad no graph term is built
    from model import token_logprobs
    h, w = torch.randn(1, 0, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    logp, ent = token_logprobs(h, w, torch.zeros(1, 0, dtype=torch.long))
    assert logp.shape == (1, 0) and logp.requires_grad
    (logp.sum() + ent.sum()).backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w)) and h.grad is not None
    with torch.no_grad():
        assert not token_logprobs(h, w, torch.zeros(1, 0, dtype=torch.long))[0].requires_grad
