"""
Hugging Face checkpoints in and out: the two layouts found in the wild, read through an explicit key map that
asserts every tensor is used and every shape matches (a silent partial load is the worst bug this repo can have),
whole or one FSDP unit at a time; and the one writer, the transformers-native layout (a trained policy loads in
transformers and serving engines).

    model = load_pretrained("/models/InternVL3-1B")                 # either layout, single file or sharded
    save_pretrained(model, "out/hf")                                # = write_hf_checkpoint(path, cfg, tensors)
    save_pretrained(model, "out/hf", tok=tok)                       # + write_hf_processor: tokenizer, processor,
                                                                    #   chat template, generation config
Layouts: the transformers-native one (`model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head`) and the original `InternVLChatModel` one (`vision_model.*` with fused qkv,
`mlp1.*`, `language_model.*`), which Skywork-R1V3 shares.
"""
import json
import os
import re

import torch

from model import VLM, VLMConfig

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
    rope = {**(t.get("rope_parameters") or {}), **(t.get("rope_scaling") or {})}  # as transformers 5 merges them
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    # InternVL3 ships rope_scaling {"type": "dynamic", "factor": 2.0} (dynamic NTK). transformers computes its
    # inv_freq with seq_len = max_position_embeddings, where the NTK base factor is (factor - (factor - 1))^... = 1,
    # and recomputes it only for sequences longer than that: up to max_position_embeddings it IS the default RoPE,
    # which is what model.py implements. Longer sequences would differ (generation stays far below 32768).
    if rope_type not in ("default", "dynamic"):
        raise ValueError(f"{cfg_path}: rope scaling {rope} is not supported")
    # kept as the checkpoint wrote it (rope_scaling, else rope_parameters without its theta), so the export keeps it
    scaling = t.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_scaling = json.dumps(scaling, sort_keys=True) if rope_type != "default" else ""
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
        max_position_embeddings=t.get("max_position_embeddings", 32768), rope_scaling=rope_scaling,
        image_token_id=int(image_token_id), **kw)
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
    FSDP loading reads the same plan one unit at a time (plumbing/checkpoint.py build_model)."""
    plan = checkpoint_plan(path, cfg, layout)  # every check that needs no tensor data, before reading any
    sd = read_checkpoint_tensors(plan, [n for n in plan if n != "__head__"], dtype)
    if cfg.tie_embeddings:
        sd["llm.lm_head.weight"] = sd["llm.wte.weight"]
    return sd


def _transformers_version():
    try:
        import transformers
        return transformers.__version__
    except ImportError:  # a requirement of the project; only a stripped-down environment lacks it
        return None


def hf_config(cfg, dtype="float32"):
    """VLMConfig -> a transformers-native InternVLConfig dict (loads in InternVLForConditionalGeneration), as
    save_pretrained writes it: with the transformers_version that wrote it (transformers 5.17, unlike 5.25, takes a
    local tokenizer of > 100k tokens next to a config.json WITHOUT one for a possibly broken Mistral tokenizer and
    warns "incorrect regex pattern ... incorrect tokenization") and the source's rope scaling, both as rope_parameters
    (transformers 5) and as rope_scaling (transformers 4 and the serving engines built on it)."""
    scaling = json.loads(cfg.rope_scaling) if cfg.rope_scaling else None
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        rope_parameters = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": kind,
                           "rope_theta": cfg.rope_theta}
    text = dict(model_type="qwen3" if cfg.llm_qk_norm else "qwen2", vocab_size=cfg.vocab_size,
                hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_eps,
                rope_theta=cfg.rope_theta, rope_parameters=rope_parameters,
                attention_bias=cfg.qkv_bias, tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False)
    if scaling:
        text["rope_scaling"] = scaling
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
                nanor1v=dict(max_tiles=cfg.max_tiles, use_thumbnail=cfg.use_thumbnail),
                transformers_version=_transformers_version())


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
    one writer. Stale model*.safetensors from an earlier save are removed first."""
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


# -----------------------------------------------------------------------------
# the files beside the weights that transformers' AutoProcessor / InternVLProcessor and serving engines read: the
# tokenizer (with the image-token attributes InternVLProcessor takes from it), the image and video processor
# configs, the processor config, the chat template and the generation config. Written as JSON, in the layout of
# the OpenGVLab/InternVL3-*-hf repos (one file each; transformers 5 also reads it), not by building transformers'
# InternVLProcessor: that needs torchvision (its video processor; transformers 5.25 cannot build the processor
# without one), which the CPU environment does not have. tests/test_export.py checks that AutoProcessor loads these
# files and encodes an image and a question as data/common.py does.

# InternVLProcessor reads these tokenizer attributes (transformers 5: tokenizer_config.json's top-level "*_token"
# keys, as its save_pretrained writes them; transformers 4's "extra_special_tokens" dict is not written). It also
# reads a video_token, and transformers adds a named token that is not in the vocabulary as a new one, past the
# model's embedding rows. The video token is only matched in the text (the processor replaces it by image spans), so
# a token the vocabulary already has serves: <video>, else Qwen's <|video_pad|> (InternVL3 and R1V3 have it), else
# <video> all the same (the synthetic tokenizer: it loads with one token more than the model's vocab_size, unused
# unless a prompt holds "<video>").
PROCESSOR_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
VIDEO_TOKENS = ("<video>", "<|video_pad|>")

# data/common.py build_prompt_text as a chat template: ChatML; an image becomes <IMG_CONTEXT>, which the processor
# expands to <img><IMG_CONTEXT> x (tokens per tile x tiles)</img>; several images are numbered "Image-i: ", images
# before the text as in our prompts; the generation prompt opens the forced "<think>\n" of our rollouts
# (enable_thinking=False leaves it out, as think=False does).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set ns = namespace(i=0) -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}"
    "{%- set ns.i = ns.i + 1 -%}"
    "{%- if n_images > 1 -%}{{- 'Image-' + ns.i | string + ': ' -}}{%- endif -%}"
    "{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif content['type'] == 'video' -%}"
    "{{- '<video>\\n' -}}"
    "{%- elif content['type'] == 'text' -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is not defined or enable_thinking -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def chat_template(system=""):
    """CHAT_TEMPLATE, or with `system` as the default system turn (written when the messages open with none), for
    a model trained with that system message: serving engines apply the template, they do not read config.json's
    "system_message" (data/common.py save_system)."""
    if not system:
        return CHAT_TEMPLATE
    literal = json.dumps(system, ensure_ascii=False)  # a JSON string is a Jinja string literal
    return ("{%- if messages and messages[0]['role'] != 'system' -%}"
            "{{- '<|im_start|>system\\n' + " + literal + " + '<|im_end|>\\n' -}}"
            "{%- endif -%}" + CHAT_TEMPLATE)


def _token_id(tok, token):
    i = tok.convert_tokens_to_ids(token)
    return None if i is None or (i == tok.unk_token_id and token != tok.unk_token) else int(i)


def write_hf_processor(path, cfg, tok, system=""):
    """The tokenizer and the processor files of a transformers-native export (next to write_hf_checkpoint's
    weights and config.json), so that AutoProcessor.from_pretrained(path) encodes prompts as data/common.py does:
      tokenizer files      tok.save_pretrained, plus the attributes InternVLProcessor reads (PROCESSOR_TOKENS)
      preprocessor_config.json        GotOcr2ImageProcessor: InternVL's dynamic tiling (crop_to_patches, 1 to
                                      cfg.max_tiles tiles of cfg.image_size, a thumbnail when > 1 tile, bicubic,
                                      ImageNet mean/std): the tiles of data/common.py dynamic_preprocess
      video_preprocessor_config.json  InternVLVideoProcessor, one tile per frame at the same size and normalisation
      processor_config.json           InternVLProcessor, image_seq_length = tokens per tile
      chat_template.jinja             chat_template(system) (read by the tokenizer and the processor alike)
      generation_config.json          eos = <|im_end|> then <|endoftext|> (data/common.py stop_token_ids), bos and pad
    GotOcr2ImageProcessor always adds the thumbnail: a config with use_thumbnail=False and max_tiles > 1 is written
    with a warning (its processor adds one tile more than our prompts)."""
    import warnings

    from data.common import IM_END, IMAGENET_MEAN, IMAGENET_STD

    missing = [t for t in PROCESSOR_TOKENS.values() if _token_id(tok, t) is None]
    if missing:
        raise ValueError(f"export to {path}: the tokenizer has no {missing} token(s); InternVLProcessor needs them")
    if _token_id(tok, PROCESSOR_TOKENS["context_image_token"]) != cfg.image_token_id:
        raise ValueError(f"export to {path}: the tokenizer's <IMG_CONTEXT> is id "
                         f"{_token_id(tok, '<IMG_CONTEXT>')}, the model's image_token_id is {cfg.image_token_id}")
    if not cfg.use_thumbnail and cfg.max_tiles > 1:
        warnings.warn(f"export to {path}: use_thumbnail=False cannot be expressed in transformers' "
                      "GotOcr2ImageProcessor, which adds a thumbnail tile to every image of more than one tile")
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    version = _transformers_version()

    def write(name, obj):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    tc_path = os.path.join(path, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc.pop("chat_template", None)  # chat_template.jinja below is the one template
    tc.pop("fix_mistral_regex", None)  # a loading option (plumbing/checkpoint.py open_tokenizer), not the tokenizer's
    video = next((t for t in VIDEO_TOKENS if _token_id(tok, t) is not None), VIDEO_TOKENS[0])
    tc.update(PROCESSOR_TOKENS, video_token=video, processor_class="InternVLProcessor")
    write("tokenizer_config.json", tc)
    if os.path.exists(os.path.join(path, "chat_template.json")):  # the older processor format: it would win
        os.remove(os.path.join(path, "chat_template.json"))
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(chat_template(system))

    size = {"height": cfg.image_size, "width": cfg.image_size}
    common = dict(do_convert_rgb=True, do_resize=True, size=size, resample=3,  # PIL bicubic, as dynamic_preprocess
                  do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                  image_std=list(IMAGENET_STD))
    write("preprocessor_config.json", dict(
        image_processor_type="GotOcr2ImageProcessor", processor_class="InternVLProcessor", crop_to_patches=True,
        min_patches=1, max_patches=cfg.max_tiles, **common))
    write("video_preprocessor_config.json", dict(
        video_processor_type="InternVLVideoProcessor", processor_class="InternVLProcessor", initial_shift=True,
        do_sample_frames=False, **common))
    write("processor_config.json", dict(image_seq_length=cfg.tokens_per_tile, processor_class="InternVLProcessor"))

    eos = [i for i in dict.fromkeys([_token_id(tok, IM_END), _token_id(tok, "<|endoftext|>"), _token_id(
        tok, tok.eos_token) if tok.eos_token else None]) if i is not None]
    if not eos:
        raise ValueError(f"export to {path}: the tokenizer has no <|im_end|>, <|endoftext|> or eos token")
    gen = dict(eos_token_id=eos if len(eos) > 1 else eos[0])
    bos = tok.bos_token_id if tok.bos_token_id is not None else _token_id(tok, "<|endoftext|>")  # Qwen2's bos
    if bos is not None:
        gen["bos_token_id"] = bos
    if tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    write("generation_config.json", dict(sorted(gen.items()), transformers_version=version))


# -----------------------------------------------------------------------------
# whole models


def load_pretrained(path, dtype=torch.float32, device="cpu", image_token_id=None):
    """A VLM from a local HF directory (transformers-native or original InternVLChatModel layout, single file or
    sharded). Built on the meta device and given the loaded tensors: one copy in memory, in `dtype`."""
    cfg, layout = load_config(path, image_token_id)
    sd = hf_state_dict(path, cfg, layout, dtype)
    with torch.device("meta"):
        model = VLM(cfg)
    model.load_state_dict(sd, strict=True, assign=True)  # the loaded tensors become the parameters
    model.llm.tie_weights()  # assign replaced the shared parameter: tie again
    return model.to(device)


def save_pretrained(model, path, state_dict=None, max_shard_bytes=5 * 2**30, tok=None, system=""):
    """Write a model (or a full state dict of it, e.g. gathered from FSDP shards) in the transformers-native layout
    with write_hf_checkpoint; with a tokenizer, also its files and the processor's (write_hf_processor)."""
    sd = model.state_dict() if state_dict is None else state_dict
    write_hf_checkpoint(path, model.cfg, ((n, t.detach().to("cpu")) for n, t in sd.items()), max_shard_bytes)
    if tok is not None:
        write_hf_processor(path, model.cfg, tok, system)
