"""
The Hugging Face export where people use it (issue 19): plumbing/checkpoint.py export_hf writes a directory that
transformers' AutoProcessor, AutoTokenizer, GenerationConfig and InternVLForConditionalGeneration load, that
encodes an image and a question as data/common.py does, and that keeps the source's rope_scaling.

Sources: a tiny random InternVL (tests/hf_fixtures.py) with the REAL InternVL3 vocabulary (151,674 ids, the
real_tokenizer_dir fixture of tests/conftest.py; tied embeddings keep it small), saved by transformers
("native") and as an original-layout InternVLChatModel checkpoint with R1V3's dynamic rope_scaling and 6 tiles at
most ("original"). Each is loaded by our loader and exported by export_hf, as grpo.py / sft.py do.

The tests marked `needs_torchvision` build transformers' InternVLProcessor, whose video processor needs torchvision:
they run on .venv-gpu-stack and skip on .venv. Everything else runs everywhere (GotOcr2ImageProcessorPil checks the
tiling without torchvision).

    .venv-gpu-stack/bin/python -m pytest -q tests/test_export.py
"""
import importlib.util
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from data.common import IMAGENET_STD, build_prompt_ids, build_prompt_text, load_image
from hf_fixtures import make_hf_model, rel_err, write_original_layout
from plumbing.checkpoint import export_hf, load_tokenizer
from plumbing.hf import load_config, load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "config", "models", "skywork_r1v3_38b", "config.json")) as _f:
    R1V3_ROPE_SCALING = json.load(_f)["llm_config"]["rope_scaling"]  # {"factor": 2.0, "rope_type"/"type": "dynamic"}
VOCAB, IMG_START, IMG_END, IMG_CONTEXT = 151674, 151665, 151666, 151667  # InternVL3's ids
IM_END, ENDOFTEXT, VIDEO_PAD = 151645, 151643, 151656
ORIGINAL_MAX_TILES = 6

needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="transformers' InternVLProcessor cannot be built without torchvision (its InternVLVideoProcessor needs "
           "it), which this environment lacks: run on .venv-gpu-stack")


class TransformersLog(logging.Handler):
    """Collects what transformers logs (its root logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, real_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("export_sources")
    hf, native = make_hf_model(tmp / "native", seed=41, vocab=VOCAB, image_token_id=IMG_CONTEXT, tie=True)
    original = write_original_layout(hf, str(tmp / "original"), tokenizer=False)
    for d in (native, original):
        for f in os.listdir(real_tokenizer_dir):
            shutil.copy(os.path.join(real_tokenizer_dir, f), d)
    with open(os.path.join(original, "config.json")) as f:
        c = json.load(f)
    c["llm_config"]["rope_scaling"] = R1V3_ROPE_SCALING
    c["max_dynamic_patch"] = ORIGINAL_MAX_TILES
    with open(os.path.join(original, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return hf, {"native": native, "original": original}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    """{layout: (our model, the tokenizer as grpo.py loads it, export dir)}"""
    tmp = tmp_path_factory.mktemp("exports")
    out = {}
    tok = load_tokenizer("", sources[1]["original"])  # both sources hold the same tokenizer files
    for layout, src in sources[1].items():
        model = load_pretrained(src).eval()
        export_hf(model, str(tmp / layout), tok)
        out[layout] = (model, tok, str(tmp / layout))
    return out


def read_json(d, name):
    with open(os.path.join(d, name)) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# everywhere (no torchvision)


@pytest.mark.parametrize("layout", ["native", "original"])
def test_config_is_the_hf_layout_with_version_and_rope_scaling(exports, sources, layout):
    """config.json as transformers' save_pretrained writes it: transformers_version recorded, the transformers-native
    InternVL layout (also from an original-layout source), and the source's rope scaling kept: R1V3's dynamic NTK
    as rope_scaling (transformers 4, vLLM) and rope_parameters (transformers 5), and back through our loader."""
    import transformers
    from transformers import AutoConfig
    _, _, d = exports[layout]
    c = read_json(d, "config.json")
    assert c["transformers_version"] == transformers.__version__
    assert (c["architectures"], c["model_type"], c["image_token_id"]) == (
        ["InternVLForConditionalGeneration"], "internvl", IMG_CONTEXT)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        assert all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."))
                   for k in f.keys()), sorted(f.keys())[:5]
    text = c["text_config"]
    src_cfg = load_config(sources[1][layout])[0]
    if layout == "original":
        assert text["rope_scaling"] == R1V3_ROPE_SCALING
        assert text["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": src_cfg.rope_theta}
        rope = AutoConfig.from_pretrained(d).text_config.rope_parameters
        assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("dynamic", 2.0, src_cfg.rope_theta)
        assert json.loads(src_cfg.rope_scaling) == R1V3_ROPE_SCALING
    else:
        assert "rope_scaling" not in text and text["rope_parameters"]["rope_type"] == "default"
        assert src_cfg.rope_scaling == ""
    back = load_config(d)[0]
    assert back.rope_scaling == src_cfg.rope_scaling  # export -> load -> export keeps it
    assert (back.max_tiles, back.use_thumbnail) == (src_cfg.max_tiles, src_cfg.use_thumbnail)


def test_real_r1v3_config_keeps_its_rope_scaling():
    """The shipped R1V3 config: load_config carries its rope_scaling, hf_config writes it back."""
    from plumbing.hf import hf_config
    cfg = load_config(os.path.join(ROOT, "config", "models", "skywork_r1v3_38b"))[0]
    text = hf_config(cfg)["text_config"]
    assert text["rope_scaling"] == R1V3_ROPE_SCALING
    assert text["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}


@pytest.mark.parametrize("layout", ["native", "original"])
def test_generation_config(exports, layout):
    """generation_config.json: generation stops at <|im_end|> (then <|endoftext|>: data/common.py stop_token_ids),
    bos/pad as Qwen2's config and tokenizer give them."""
    from transformers import GenerationConfig
    _, _, d = exports[layout]
    g = GenerationConfig.from_pretrained(d)
    assert g.eos_token_id == [IM_END, ENDOFTEXT]
    assert (g.bos_token_id, g.pad_token_id) == (ENDOFTEXT, ENDOFTEXT)


@pytest.mark.parametrize("layout", ["native", "original"])
def test_export_tokenizer_loads_quietly_with_the_processor_attributes(exports, layout):
    """The export's tokenizer on the installed transformers: no "incorrect regex pattern" warning (transformers
    5.17, in .venv-gpu-stack, takes a > 100k-token tokenizer beside a config.json without transformers_version for
    a broken Mistral one; 5.25 no longer does), and what InternVLProcessor.__init__ reads from it; no token
    added past the model's embedding rows (the video token is Qwen's <|video_pad|>, already in the vocabulary)."""
    from transformers import AutoTokenizer
    _, _, d = exports[layout]
    with TransformersLog() as log:
        tok = AutoTokenizer.from_pretrained(d)
    assert not [m for m in log.lines if "incorrect regex pattern" in m], log.lines
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == (
        IMG_START, IMG_END, IMG_CONTEXT)
    assert (tok.video_token, tok.convert_tokens_to_ids(tok.video_token)) == ("<|video_pad|>", VIDEO_PAD)
    assert len(tok) == VOCAB
    assert read_json(d, "processor_config.json") == {"image_seq_length": 4, "processor_class": "InternVLProcessor"}


def test_load_tokenizer_of_an_original_checkpoint_is_quiet(sources, capsys):
    """Our load_tokenizer on an original-layout directory (R1V3's config.json records no transformers_version and
    names remote code for the model): no "incorrect regex pattern" warning on transformers 5.17, and no question on
    stdin about running the remote code."""
    with TransformersLog() as log:
        tok = load_tokenizer("", sources[1]["original"])
    assert not [m for m in log.lines if "incorrect regex pattern" in m], log.lines
    # nor "You are using a model of type `internvl_chat` to instantiate a model of type ``" (AutoTokenizer reading
    # the model's config.json, whose model_type transformers does not know)
    assert not [m for m in log.lines if "to instantiate a model of type" in m], log.lines
    assert "Do you wish to run the custom code" not in capsys.readouterr().out
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == IMG_CONTEXT


def test_chat_template_is_our_prompt(exports):
    """The export's chat template renders data/common.py build_prompt_text, with and without a system turn and the
    forced <think> (enable_thinking=False: think=False), for no, one and two images (each <IMG_CONTEXT> there is an
    image, which the processor expands to <img><IMG_CONTEXT> x n</img>)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(exports["original"][2])
    q = "How many red circles?\nA. 1\nB. 2"
    for system in (None, "You are a careful assistant."):
        for think in (True, False):
            for n_images in (0, 1, 2):
                content = [{"type": "image"}] * n_images + [{"type": "text", "text": q}]
                msgs = [{"role": "system", "content": system}] if system else []
                msgs.append({"role": "user", "content": content})
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                               enable_thinking=think)
                text = text.replace("<IMG_CONTEXT>", "<img><IMG_CONTEXT></img>")
                assert text == build_prompt_text(q, [1] * n_images, 1, think=think, system=system), (
                    system, think, n_images, text)
    plain = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert plain == build_prompt_text(q, [], 1)  # string content, as text-only clients send it


def test_chat_template_with_the_runs_system_message(exports, tmp_path):
    """export_hf(..., system=S) (write_hf_processor): the template writes S when the messages bring no system turn
    (serving engines apply the template; they do not read config.json's system_message), a given one replaces it."""
    from plumbing.hf import write_hf_processor
    model, tok, _ = exports["original"]
    system = 'Say "hi"\\ then think,\n书生·万象。'  # quotes, a backslash, a newline, non-ASCII
    write_hf_processor(str(tmp_path), model.cfg, tok, system=system)
    with open(tmp_path / "chat_template.jinja") as f:
        template = f.read()
    q = "How many?"
    for given in (None, "Other."):
        msgs = [{"role": "system", "content": given}] if given else []
        msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]})
        text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        text = text.replace("<IMG_CONTEXT>", "<img><IMG_CONTEXT></img>")
        assert text == build_prompt_text(q, [1], 1, system=given or system), text


def test_image_processor_tiles_as_ours(exports):
    """preprocessor_config.json in transformers' PIL backend (no torchvision needed): the tiles and pixel values of
    data/common.py load_image (InternVL's dynamic_preprocess) exactly, for several aspect ratios and max_tiles."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    g = np.random.default_rng(0)
    for layout in ("native", "original"):
        model, _, d = exports[layout]
        cfg = model.cfg
        assert read_json(d, "preprocessor_config.json")["max_patches"] == cfg.max_tiles
        ip = GotOcr2ImageProcessorPil.from_pretrained(d)
        for w, h in ((900, 600), (600, 900), (300, 280), (2000, 300), (97, 1000), (1500, 1499)):
            img = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ours = load_image(img, cfg.image_size, cfg.max_tiles, cfg.use_thumbnail)
            theirs = ip(images=[img], return_tensors="pt")["pixel_values"]
            assert theirs.shape == ours.shape, (layout, w, h, theirs.shape, ours.shape)
            assert torch.allclose(theirs, ours, atol=1e-5), (layout, w, h, (theirs - ours).abs().max())
    assert ip.max_patches == ORIGINAL_MAX_TILES


# -----------------------------------------------------------------------------
# transformers' processor and model (torchvision)


def question_image(seed=0, size=(900, 600)):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@needs_torchvision
@pytest.mark.parametrize("layout", ["native", "original"])
@torch.no_grad()
def test_processor_and_transformers_logits_match_ours(exports, layout):
    """AutoProcessor.from_pretrained(export) turns a 900x600 image (3x2 tiles + thumbnail) and a question, through
    the export's chat template, into our input ids (data/common.py build_prompt_ids, think=True) and our pixel
    values: exactly with the PIL backend, within one intensity level with the default torchvision one (its bicubic
    resize rounds differently). InternVLForConditionalGeneration.from_pretrained(export) on the processor's inputs
    gives our logits (fp32); for the original source that is under the dynamic rope scaling, which equals plain RoPE
    below max_position_embeddings."""
    from transformers import AutoImageProcessor, AutoProcessor, InternVLForConditionalGeneration
    model, tok, d = exports[layout]
    cfg = model.cfg
    img, q = question_image(), "Which colour covers most of the picture? Answer briefly."
    ours_pv = load_image(img, cfg.image_size, cfg.max_tiles, cfg.use_thumbnail)
    n_tiles = ours_pv.shape[0]
    assert n_tiles == 7
    ours_ids = build_prompt_ids(tok, q, [n_tiles], cfg.tokens_per_tile, think=True)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    proc = AutoProcessor.from_pretrained(d)
    # AutoProcessor.from_pretrained(d, backend="pil") fails in transformers 5.17 (the video processor gets it too)
    pil = AutoImageProcessor.from_pretrained(d, backend="pil")
    for backend, image_processor, atol in (("pil", pil, 1e-6),
                                           ("default", proc.image_processor, 1.01 / 255 / min(IMAGENET_STD))):
        proc.image_processor = image_processor
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = proc(text=[text], images=[img], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ours_ids, backend
        assert inputs["pixel_values"].shape == ours_pv.shape
        err = (inputs["pixel_values"] - ours_pv).abs().max().item()
        assert err <= atol, (backend, err)
        if backend == "pil":
            pil_inputs = inputs
    hf = InternVLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    theirs = hf(input_ids=pil_inputs["input_ids"], pixel_values=pil_inputs["pixel_values"]).logits.float()
    ours = model(torch.tensor([ours_ids]), ours_pv).float()
    assert rel_err(ours, theirs) <= 1e-4
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())
