"""
Tiny random InternVL checkpoints built by transformers (no downloads), for parity tests.

Written from transformers' InternVL/Qwen2 models and the OpenGVLab InternVL sources, not from our
model.py, so a test that compares the two checks model.py against references no one here wrote.

    tiny_internvl_config(...)            -> transformers.InternVLConfig (ViT 32 wide, LLM 64 wide)
    make_hf_model(tmp_path, **cfg)       -> (InternVLForConditionalGeneration fp32 eval, dir with save_pretrained)
    write_original_layout(hf, dir, ...)  -> the same weights as an OpenGVLab `InternVLChatModel` checkpoint
    write_tokenizer(dir)                 -> tokenizer.json + tokenizer_config.json with <IMG_CONTEXT> at IMG_CONTEXT_ID
    make_batch(tiles_per_row, T, ...)    -> (input_ids (B,T), pixel_values (N_tiles,3,H,W) or None)
    rand_prompt(g, n_text, n_tiles)      -> one (input_ids list, pixel_values or None) prompt for sampler.generate
    hf_logits(hf, input_ids, pv)         -> (B,T,vocab) reference logits
    rel_err(a, b)                        -> max|a-b| / max|b|
"""
import json
import os

import torch
from safetensors.torch import save_file

# Tiny sizes: 28 px tiles, 7 px patches -> 4x4 = 16 patches -> pixel shuffle 0.5 -> 4 tokens per tile.
IMAGE_SIZE, PATCH_SIZE = 28, 7
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4
VOCAB = 128
# Same special-token strings as the real InternVL3/Qwen2.5 template; they take the ids after the regular
# tokens, like added tokens do in the real tokenizer (there <IMG_CONTEXT> is 151667).
N_REGULAR = 120
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<think>", "</think>"]
SPECIAL_IDS = {s: N_REGULAR + i for i, s in enumerate(SPECIALS)}
IMG_START_ID, IMG_END_ID, IMG_CONTEXT_ID = SPECIAL_IDS["<img>"], SPECIAL_IDS["</img>"], SPECIAL_IDS["<IMG_CONTEXT>"]
ROPE_THETA = 5000.0  # deliberately not a library default, so a loader that ignores it is caught


def tiny_internvl_config(tie=False, vit_norm="layer_norm", vit_qk_norm=False, qkv_bias=True, vocab=VOCAB,
                         image_token_id=IMG_CONTEXT_ID, rope_theta=ROPE_THETA, rms_eps=1e-6, vit_eps=1e-6):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config
    # field names as in transformers/models/internvl/configuration_internvl.py and qwen2/configuration_qwen2.py
    vision = InternVLVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, norm_type=vit_norm, use_qk_norm=vit_qk_norm,
        attention_bias=qkv_bias, layer_norm_eps=vit_eps, hidden_act="gelu",
        use_mean_pooling=True,  # InternVL's ViT has no final norm (use_mean_pooling=False would add one)
    )
    text = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=rms_eps, max_position_embeddings=512, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, projector_hidden_act="gelu",
                         tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"  # the plain-math reference path
    return cfg


@torch.no_grad()
def randomize_(model, seed=0):
    """Re-initialise every parameter (norms, biases, layer-scale, cls token, position embeddings included)
    with distinct random values, so a swapped, missing or default-initialised tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):  # named_parameters lists a tied tensor once
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif p.ndim == 1:  # norm weights and layer-scale lambdas: around 1 so the signal survives, but distinct
            p.copy_(1.0 + 0.2 * noise)
        elif p.shape[0] == 1:  # cls token (1,1,C), position embeddings (1,N+1,C)
            p.copy_(0.5 * noise)
        else:  # Linear (out,in), Conv (out,3,p,p), Embedding (V,C): ~1/sqrt(fan_in) keeps activations O(1)
            fan_in = p[0].numel()
            p.copy_(noise / fan_in ** 0.5)
    return model


def make_hf_model(tmp_path, seed=0, **cfg):
    """A random transformers InternVLForConditionalGeneration in fp32 eval mode, saved with save_pretrained."""
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(seed)
    config = tiny_internvl_config(**cfg)
    hf = InternVLForConditionalGeneration(config).float().eval()
    randomize_(hf, seed)
    emb, head = hf.model.language_model.embed_tokens.weight, hf.lm_head.weight
    assert (emb.data_ptr() == head.data_ptr()) == bool(config.tie_word_embeddings), "transformers did not (un)tie"
    d = os.path.join(str(tmp_path), "hf")
    hf.save_pretrained(d)
    return hf, d


def write_tokenizer(d):
    """Minimal fast tokenizer (WordLevel over t0..t119 + the special tokens as added tokens) saved the way
    real checkpoints ship it: tokenizer.json with an `added_tokens` list, tokenizer_config.json with
    `added_tokens_decoder`. Returns the id of <IMG_CONTEXT>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(N_REGULAR)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    assert all(tok.token_to_id(s) == i for s, i in SPECIAL_IDS.items())
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for s, i in SPECIAL_IDS.items()}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 8192}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    return SPECIAL_IDS["<IMG_CONTEXT>"]


def original_state_dict(hf):
    """transformers-native names -> OpenGVLab InternVLChatModel names. The inverse of
    transformers/models/internvl/convert_internvl_weights_to_hf.py (ORIGINAL_TO_CONVERTED_KEY_MAPPING_*),
    checked against internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py: the ViT attention
    has one fused `qkv` Linear whose output rows are [q; k; v] (reshape(B,N,3,heads,hd) in _naive_attn)."""
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    n_vit = hf.config.vision_config.num_hidden_layers
    tied = hf.config.tie_word_embeddings
    out = {}
    V, P = "model.vision_tower.", "model.multi_modal_projector."
    out["vision_model.embeddings.class_embedding"] = sd.pop(V + "embeddings.cls_token")  # (1,1,C)
    out["vision_model.embeddings.position_embedding"] = sd.pop(V + "embeddings.position_embeddings")  # (1,N+1,C)
    for s in ["weight", "bias"]:
        out[f"vision_model.embeddings.patch_embedding.{s}"] = sd.pop(f"{V}embeddings.patch_embeddings.projection.{s}")
    for i in range(n_vit):
        h, o = f"{V}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        out[o + "ls1"], out[o + "ls2"] = sd.pop(h + "lambda_1"), sd.pop(h + "lambda_2")
        for s in ["weight", "bias"]:
            qkv = [sd.pop(f"{h}attention.{x}_proj.{s}", None) for x in "qkv"]
            if qkv[0] is not None:
                out[f"{o}attn.qkv.{s}"] = torch.cat(qkv, 0)  # (3C, C) / (3C,)
            out[f"{o}attn.proj.{s}"] = sd.pop(f"{h}attention.projection_layer.{s}")
            for a, b in [("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2"), ("attn.q_norm", "attention.q_norm"), ("attn.k_norm", "attention.k_norm")]:
                if h + f"{b}.{s}" in sd:
                    out[o + f"{a}.{s}"] = sd.pop(h + f"{b}.{s}")
    # mlp1 = Sequential(LayerNorm, Linear, GELU, Linear) -> indices 0, 1, 3
    for a, b in [("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")]:
        for s in ["weight", "bias"]:
            out[f"mlp1.{a}.{s}"] = sd.pop(f"{P}{b}.{s}")
    for k in [k for k in sd if k.startswith("model.language_model.")]:
        out["language_model.model." + k[len("model.language_model."):]] = sd.pop(k)
    head = sd.pop("lm_head.weight")
    if not tied:  # a tied checkpoint stores the embedding once, as save_pretrained does
        out["language_model.lm_head.weight"] = head
    assert not sd, f"unmapped transformers tensors: {sorted(sd)}"
    return out


def original_config(hf):
    """config.json of an OpenGVLab InternVLChatModel checkpoint (field names from configuration_internvl_chat.py
    and configuration_intern_vit.py; llm_config in the transformers-4.x style real checkpoints carry:
    rope_theta at top level, no rope_parameters)."""
    vc, tc = hf.config.vision_config, hf.config.text_config
    image_size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch_size = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": vc.hidden_size, "num_hidden_layers": vc.num_hidden_layers,
        "num_attention_heads": vc.num_attention_heads, "intermediate_size": vc.intermediate_size,
        "image_size": image_size, "patch_size": patch_size, "num_channels": 3,
        "qkv_bias": vc.attention_bias, "qk_normalization": vc.use_qk_norm, "norm_type": vc.norm_type,
        "layer_norm_eps": vc.layer_norm_eps, "hidden_act": vc.hidden_act, "initializer_factor": 0.1,
        "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": False,
        "torch_dtype": "float32",
    }
    llm = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": tc.rope_parameters["rope_theta"], "rope_scaling": None,
        "max_position_embeddings": tc.max_position_embeddings, "max_window_layers": tc.num_hidden_layers,
        "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
        "tie_word_embeddings": bool(hf.config.tie_word_embeddings), "use_cache": True,
        "bos_token_id": SPECIAL_IDS["<|endoftext|>"], "eos_token_id": SPECIAL_IDS["<|im_end|>"],
        "torch_dtype": "float32",
    }
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "vision_config": vision, "llm_config": llm,
        "downsample_ratio": hf.config.downsample_ratio, "ps_version": "v2", "select_layer": -1,
        "template": "internvl2_5", "force_image_size": image_size, "dynamic_image_size": True,
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "use_thumbnail": True, "pad2square": False,
        "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32",
    }


def write_original_layout(hf, d, sharded=False, tokenizer=True):
    """Write `hf`'s weights as an original-layout InternVLChatModel checkpoint into directory d: config.json,
    model.safetensors (or two shards + model.safetensors.index.json), and optionally the tokenizer files that
    carry the <IMG_CONTEXT> id (the original config.json has no image_token_id)."""
    os.makedirs(d, exist_ok=True)
    sd = original_state_dict(hf)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(original_config(hf), f, indent=2)
    meta = {"format": "pt"}
    if not sharded:
        save_file(sd, os.path.join(d, "model.safetensors"), metadata=meta)
    else:
        # split so that one layer's tensors straddle the two files, as real shards do
        keys = sorted(sd)
        half = len(keys) // 2
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weight_map = {}
        for name, part in zip(names, [keys[:half], keys[half:]]):
            save_file({k: sd[k] for k in part}, os.path.join(d, name), metadata=meta)
            weight_map.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer:
        write_tokenizer(d)
    return d


def make_batch(tiles_per_row, T=24, seed=0, image_token_id=IMG_CONTEXT_ID):
    """input_ids (B,T) of random text tokens; row b holds one image of tiles_per_row[b] tiles (0: no image)
    as <img> + <IMG_CONTEXT> x (4 * tiles) + </img> at an offset that differs per row.
    pixel_values (sum(tiles), 3, 28, 28), or None when no row has an image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N_REGULAR, (len(tiles_per_row), T), generator=g)
    for b, n in enumerate(tiles_per_row):
        if n == 0:
            continue
        start = 1 + b % 3
        span = [IMG_START_ID] + [image_token_id] * (TOKENS_PER_TILE * n) + [IMG_END_ID]
        assert start + len(span) < T, "T too short for the image span"
        ids[b, start:start + len(span)] = torch.tensor(span)
    n_tiles = sum(tiles_per_row)
    pv = torch.randn(n_tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) if n_tiles else None
    return ids, pv


@torch.no_grad()
def hf_logits(hf, input_ids, pixel_values=None):
    return hf(input_ids=input_ids, pixel_values=pixel_values).logits.float()


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return ((a - b).abs().max() / b.abs().max()).item()


def rand_prompt(g, n_text, n_tiles):
    # text tokens, an image span of n_tiles tiles after the first two tokens, more text
    ids = torch.randint(0, N_REGULAR, (n_text,), generator=g).tolist()
    if n_tiles:
        ids = ids[:2] + [IMG_START_ID] + [IMG_CONTEXT_ID] * (TOKENS_PER_TILE * n_tiles) + [IMG_END_ID] + ids[2:]
    pv = torch.randn(n_tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) if n_tiles else None
    return ids, pv
