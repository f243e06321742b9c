"""
Loading at scale: the config-only directories of the real models (config/models/), their parameter counts against the
published sizes, the Skywork-R1V layout, streaming bf16 export, and FSDP2 loading one unit at a time under a real
2-process gloo torchrun (tests/dist_loading_worker.py): sharded == single-process, a bad checkpoint stops every rank
with the tensor's name, and peak RSS per rank stays near the rank's shard.

    pytest -q tests/test_loading.py --durations=5
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_fixtures import (IMG_CONTEXT_ID, N_REGULAR, hf_logits, make_batch, make_hf_model, rel_err,
                         write_original_layout)
from model import VLM, VLMConfig
from plumbing.hf import load_config, load_pretrained, save_pretrained, write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "config", "models")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_loading_worker.py")
B = 1e9


def n(module):
    return sum(p.numel() for p in module.parameters())


def meta_model(name):
    cfg, layout = load_config(os.path.join(MODELS, name))
    with torch.device("meta"):  # real shapes, no memory
        return VLM(cfg), layout


# -----------------------------------------------------------------------------
# config/models: the real architectures, without weights

# Published sizes. LLMs: the Qwen2.5 model cards, "Number of Parameters" (total, with Qwen's own vocabulary: 151936
# rows for 0.5B/1.5B with tied embeddings, 152064 for 7B/32B untied) and "(Non-Embedding)". InternVL3 replaces the
# vocabulary by its 151674 rows and unties 0.5B/1.5B, so its LLM totals are not the card's: the test compares the
# non-embedding count (transformer blocks + final norm, vocabulary-independent) and the card's total rebuilt with
# Qwen's vocabulary and tying. Tolerance 1%: the cards round to 3 significant digits, and the 32B card (32.5B /
# 31.0B) is 0.8% / 0.7% under its own tensors (Qwen2.5-32B's safetensors hold 32.76B; HF shows "32.8B params").
# ViTs: InternViT-300M (~0.30B); InternViT-6B-224px's card: 5903M with 48 layers; InternVL-1.5 onwards (and
# InternVL3-38B) keep 45 of them: 5.54B, not ~5.9B. Totals: InternVL3-38B 38.4B (model card; issue 12 prints
# 38.39B); the 1B/2B/8B from their bf16 safetensors on the hub (1.88 GB, 4.18 GB, 15.9 GB at 2 bytes a parameter).
QWEN_CARD = {  # model: (Qwen2.5 size, total B, non-embedding B, Qwen vocab, tied in Qwen2.5)
    "internvl3_1b": ("0.5B", 0.49, 0.36, 151936, True),
    "internvl3_2b": ("1.5B", 1.54, 1.31, 151936, True),
    "internvl3_8b": ("7B", 7.61, 6.53, 152064, False),
    "internvl3_38b": ("32B", 32.5, 31.0, 152064, False),
    "skywork_r1v3_38b": ("32B", 32.5, 31.0, 152064, False),
}
VIT = {"internvl3_1b": 0.30, "internvl3_2b": 0.30, "internvl3_8b": 0.30, "internvl3_38b": 5.54,
       "skywork_r1v3_38b": 5.54}
TOTAL = {"internvl3_1b": 0.94, "internvl3_2b": 2.09, "internvl3_8b": 7.95, "internvl3_38b": 38.4,
         "skywork_r1v3_38b": 38.4}


@pytest.mark.parametrize("name", list(QWEN_CARD))
def test_real_model_parameter_counts(name):
    model, _ = meta_model(name)
    cfg = model.cfg
    _, card_total, card_nonemb, qwen_vocab, qwen_tied = QWEN_CARD[name]
    nonemb = n(model.llm.blocks) + n(model.llm.norm)
    assert nonemb / B == pytest.approx(card_nonemb, rel=0.01), (name, nonemb)
    as_qwen = nonemb + qwen_vocab * cfg.n_embd * (1 if qwen_tied else 2)  # the card's model: Qwen vocab and tying
    assert as_qwen / B == pytest.approx(card_total, rel=0.01), (name, as_qwen)
    # ours: InternVL3's 151674-row vocabulary, untied (0.26k / 0.39k rows fewer than Qwen's: < 0.1% of the LLM)
    assert n(model.llm) == nonemb + 2 * 151674 * cfg.n_embd
    assert n(model.vit) / B == pytest.approx(VIT[name], rel=0.02), (name, n(model.vit))
    assert n(model) / B == pytest.approx(TOTAL[name], rel=0.005), (name, n(model))


def test_internvit_6b_layer_count_matches_its_card():
    """InternViT-6B-224px: 48 layers, 5903M parameters (model card). Our 45-layer 448px tower at 48 layers and a
    16x16 grid must give that number, so the per-layer structure (RMSNorm, QK-norm, no qkv bias, layer-scale) is
    right, not only the total."""
    cfg, _ = load_config(os.path.join(MODELS, "internvl3_38b"))
    cfg.vit_layers, cfg.image_size = 48, 224
    with torch.device("meta"):
        vit = VLM(cfg).vit
    assert round(n(vit) / 1e6) == 5903


@pytest.mark.parametrize("name", list(QWEN_CARD))
def test_config_only_directories(name):
    """config.json in the original layout + a tokenizer_config.json with the real added-token ids are all
    load_config needs; the values that decide shapes, tiling and the image token are the published ones."""
    d = os.path.join(MODELS, name)
    assert sorted(os.listdir(d)) == ["config.json", "tokenizer_config.json"]
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    r1v3 = name.startswith("skywork")
    assert (c["architectures"], c["model_type"]) == ((["SkyworkR1VChatModel"], "skywork_chat") if r1v3 else
                                                     (["InternVLChatModel"], "internvl_chat"))
    model, layout = meta_model(name)
    cfg = model.cfg
    assert layout == "original"
    assert (cfg.image_token_id, cfg.vocab_size, cfg.rope_theta, cfg.rms_eps) == (151667, 151674, 1e6, 1e-6)
    assert (cfg.image_size, cfg.patch_size, cfg.tokens_per_tile, cfg.max_tiles, cfg.use_thumbnail) == \
        (448, 14, 256, 12, True)
    assert not cfg.tie_embeddings  # InternVL3 stores lm_head separately, even for the Qwen2.5-0.5B/1.5B LLMs
    big = "38b" in name
    assert (cfg.vit_norm, cfg.vit_qk_norm, cfg.vit_qkv_bias) == (("rms_norm", True, False) if big else
                                                                ("layer_norm", False, True))
    assert (cfg.vit_hidden, cfg.vit_layers, cfg.vit_heads) == ((3200, 45, 25) if big else (1024, 24, 16))


def test_rope_scaling_kinds(tmp_path):
    """InternVL3's dynamic-NTK rope_scaling equals the default RoPE below max_position_embeddings (accepted);
    the kinds that change every position (linear, yarn, ...) are still refused."""
    src = os.path.join(MODELS, "internvl3_1b")
    for kind, ok in (("dynamic", True), ("linear", False), ("yarn", False)):
        d = tmp_path / kind
        d.mkdir()
        with open(os.path.join(src, "config.json")) as f:
            c = json.load(f)
        c["llm_config"]["rope_scaling"] = {"factor": 2.0, "rope_type": kind, "type": kind}
        (d / "config.json").write_text(json.dumps(c))
        (d / "tokenizer_config.json").write_text(open(os.path.join(src, "tokenizer_config.json")).read())
        if ok:
            assert load_config(str(d))[0].rope_theta == 1e6
        else:
            with pytest.raises(ValueError, match="rope scaling"):
                load_config(str(d))


# -----------------------------------------------------------------------------
# the Skywork-R1V layout: InternVLChatModel's tensor names under another architecture name


def as_skywork(d):
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c["architectures"], c["model_type"] = ["SkyworkR1VChatModel"], "skywork_chat"
    c["auto_map"] = {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
                     "AutoModel": "modeling_skywork_chat.SkyworkChatModel"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    return d


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("untied"), seed=21, tie=False)


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("tied"), seed=22, tie=True, vit_norm="rms_norm", vit_qk_norm=True,
                         qkv_bias=False)


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_skywork_layout_parity(tmp_path, hf_untied, hf_tied, tied):
    hf, _ = hf_tied if tied else hf_untied
    d = as_skywork(write_original_layout(hf, str(tmp_path / "r1v"), sharded=tied))
    assert load_config(d)[1] == "original"
    model = load_pretrained(d).eval()
    assert model.cfg.image_token_id == IMG_CONTEXT_ID
    assert (model.llm.lm_head.weight is model.llm.wte.weight) == tied
    ids, pv = make_batch([1, 0, 2], T=24, seed=23)
    assert rel_err(model(ids, pv).float(), hf_logits(hf, ids, pv)) <= 1e-4
    text = torch.randint(0, N_REGULAR, (1, 11), generator=torch.Generator().manual_seed(24))
    assert rel_err(model(text).float(), hf_logits(hf, text)) <= 1e-4


# -----------------------------------------------------------------------------
# streaming export (one shard + one tensor in memory): same files as save_pretrained, loadable by transformers


@torch.no_grad()
def test_streamed_bf16_shards_load_in_ours_and_transformers(tmp_path, hf_untied):
    from transformers import InternVLForConditionalGeneration
    _, src = hf_untied
    model = load_pretrained(src).eval()
    out = str(tmp_path / "bf16")
    os.makedirs(out)
    open(os.path.join(out, "model-00001-of-00009.safetensors"), "w").close()  # stale: must be removed
    sd = model.state_dict()
    write_hf_checkpoint(out, model.cfg, ((k, v.to(torch.bfloat16)) for k, v in sd.items()), max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files), files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    for f in files:  # each shard within the limit (a single tensor larger than it would get its own file)
        with safe_open(os.path.join(out, f), "pt") as g:
            assert sum(g.get_tensor(k).nbytes for k in g.keys()) <= 40_000
    back = load_pretrained(out).state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k], v.to(torch.bfloat16).float()), k
    hf2, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, pv = make_batch([1, 2], T=20, seed=25)
    ours = load_pretrained(out).eval()  # the bf16 weights, computed in fp32 by both
    assert rel_err(hf_logits(hf2.float().eval(), ids, pv), ours(ids, pv).float()) <= 1e-4


# -----------------------------------------------------------------------------
# FSDP2 loading, 2 processes (gloo)


def torchrun(mode, spec, tmp_path, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    path = str(tmp_path / f"{mode}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, mode, path]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "WORKER OK rank 0" in out and "WORKER OK rank 1" in out, out[-3000:]
    return r.stdout, time.time() - t0


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, hf_untied, hf_tied):
    """One 2-process launch (process start-up dominates): the bad checkpoints first, then the good ones in the same
    process group. Checkpoints: native untied (fp32 fixture), original layout tied and sharded, Skywork; bad: a
    missing tensor (native) and a mis-shaped one (original)."""
    import shutil
    tmp = tmp_path_factory.mktemp("fsdp")
    hf, src = hf_untied
    missing = str(tmp / "missing")
    shutil.copytree(src, missing)
    sd = load_file(os.path.join(missing, "model.safetensors"))
    gone = next(k for k in sd if k.endswith("layers.1.mlp.up_proj.weight"))
    del sd[gone]
    save_file(sd, os.path.join(missing, "model.safetensors"), metadata={"format": "pt"})
    shaped = write_original_layout(hf, str(tmp / "shaped"))
    sd = load_file(os.path.join(shaped, "model.safetensors"))
    sd["mlp1.3.bias"] = torch.zeros(sd["mlp1.3.bias"].shape[0] + 1)
    save_file(sd, os.path.join(shaped, "model.safetensors"), metadata={"format": "pt"})
    dirs = [src, write_original_layout(hf_tied[0], str(tmp / "orig" / "hf"), sharded=True),
            as_skywork(write_original_layout(hf, str(tmp / "r1v" / "hf")))]
    spec = dict(bad=[missing, shaped], good=src, dirs=dirs, out=str(tmp / "run"), export=str(tmp / "export"))
    out, seconds = torchrun("load", spec, tmp, timeout=240)
    return out, seconds, spec


def test_fsdp_bad_checkpoint_stops_every_rank(fsdp_run):
    """A missing and a mis-shaped tensor: rank 0 finds them from the headers before reading any data, and BOTH ranks
    raise with the tensor's name within seconds (not at the 30-minute collective timeout). An error that only
    rank 1 sees stops rank 0 too. The whole launch (these, then the loads below) ends well within its timeout."""
    out, seconds, _ = fsdp_run
    for rank in (0, 1):
        lines = [ln for ln in out.splitlines() if ln.startswith(f"BAD OK rank {rank} ")]
        assert len(lines) == 2, out
        assert "layers.1.mlp.up_proj.weight" in lines[0] and "missing" in lines[0], lines[0]
        assert "mlp1.3.bias" in lines[1] and "shape" in lines[1], lines[1]
        line = next((ln for ln in out.splitlines() if ln.startswith(f"RANK1 ERROR OK rank {rank} ")), out)
        assert "_missing_on_rank1" in line and ("failed on rank 1" in line) == (rank == 0), line
        for ln in lines + [line]:
            assert float(ln.split()[4].rstrip("s")) < 60, ln  # seconds from the call to the exception


def test_fsdp_load_equals_single_process_and_exports_bf16(fsdp_run):
    """Sharded load == single-process load, exactly (full state dict, every layout, a tied model); then resume,
    scratch, and a bf16 export gathered from both ranks that equals bf16(fp32 masters) and loads in transformers."""
    from transformers import InternVLForConditionalGeneration
    out, _, spec = fsdp_run
    assert out.count("LOAD OK rank") == 6 and "EXPORT OK" in out, out
    hf2, info = InternVLForConditionalGeneration.from_pretrained(spec["export"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf2.dtype == torch.bfloat16


def test_fsdp_load_peak_rss(tmp_path, hf_untied):
    """~110M parameters (440 MB in fp32) stored in bf16 (220 MB). Each rank must end with its fp32 shard (~220 MB)
    and, while loading, hold little more: rank 0 one unit at a time (the largest, the root: ~18M parameters =
    36 MB in bf16), rank 1 one tensor. Bound on the peak RSS growth over the post-import baseline: shard + 25% of
    the fp32 model (110 MB). Loaders that give any rank a full copy fail it: every rank reading the checkpoint
    (220 MB bf16 + its shard = 440 MB), or the fp32 model built whole and then sharded (440 MB + shard)."""
    cfg = VLMConfig(image_size=28, patch_size=7, vit_hidden=256, vit_layers=2, vit_heads=4, vit_mlp=1024,
                    vocab_size=8192, n_embd=1024, n_layer=8, n_head=16, n_kv_head=4, mlp_hidden=2816,
                    image_token_id=8000)
    d = str(tmp_path / "big")
    with torch.device("meta"):
        model = VLM(cfg)
    sd = {k: torch.full(v.shape, 0.01, dtype=torch.bfloat16) for k, v in model.state_dict().items()}  # values: any
    save_pretrained(model, d, state_dict=sd, max_shard_bytes=100 * 2**20)
    n_params = sum(p.numel() for p in model.parameters())
    del model, sd
    ckpt = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    out, _ = torchrun("rss", dict(dir=d, warmup=hf_untied[1]), tmp_path, timeout=240)
    rows = [json.loads(ln[4:]) for ln in out.splitlines() if ln.startswith("RSS ")]
    assert len(rows) == 2, out
    fp32 = 4 * n_params
    assert 100e6 < n_params < 120e6 and abs(ckpt - 2 * n_params) < 0.01 * ckpt, (n_params, ckpt)
    for r in rows:
        grow = (r["peak_kb"] - (r["start_kb"] if r["peak_reset"] else r["base_kb"])) * 1024
        shard = r["shard_kb"] * 1024
        print(f"rank {r['rank']}: peak RSS growth {grow / 2**20:.0f} MiB (shard {shard / 2**20:.0f} MiB, "
              f"checkpoint {ckpt / 2**20:.0f} MiB bf16, model {fp32 / 2**20:.0f} MiB fp32), {r['seconds']} s")
        assert r["n_params"] == n_params
        assert abs(shard - fp32 / 2) < 0.01 * fp32
        assert grow < shard + 0.25 * fp32, r
