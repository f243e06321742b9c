# Prompts exactly as InternVL3 / Skywork-R1V3 were trained, checked with the real tokenizer (tests/real_tokenizer.py:
# Qwen2.5's BPE + InternVL3's added tokens): the tokenizer itself, the system turn, our prompt ids against reference
# strings written from InternVL's own code and transformers' -hf chat template, the chat-template check, and the
# SFT prompt/response token boundary.
import json
import os
import random
import unicodedata

import pytest
import torch
from transformers import AutoTokenizer

from data.common import (IM_END, TEMPLATE_SYSTEM, build_prompt_ids, build_prompt_text, check_chat_template,
                         encode_sft, resolve_system, save_system)
from real_tokenizer import QWEN2_PATTERN, qwen_tiktoken_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "config", "models")

# OpenGVLab/InternVL internvl_chat/internvl/conversation.py, template 'internvl2_5': system_message (U+00B7 middle
# dot, U+FF0C fullwidth comma, U+3001, U+3002), system_template '<|im_start|>system\n{system_message}', roles
# '<|im_start|>user\n' / '<|im_start|>assistant\n', SeparatorStyle.MPT with sep '<|im_end|>\n'.
INTERNVL_SYSTEM = ("\u4f60\u662f\u4e66\u751f\u00b7\u4e07\u8c61\uff0c\u82f1\u6587\u540d\u662fInternVL\uff0c\u662f\u7531"
                   "\u4e0a\u6d77\u4eba\u5de5\u667a\u80fd\u5b9e\u9a8c\u5ba4\u3001\u6e05\u534e\u5927\u5b66\u53ca\u591a"
                   "\u5bb6\u5408\u4f5c\u5355\u4f4d\u8054\u5408\u5f00\u53d1\u7684\u591a\u6a21\u6001\u5927\u8bed\u8a00"
                   "\u6a21\u578b\u3002")

# transformers src/transformers/models/internvl/convert_internvl_weights_to_hf.py, `chat_template` (the template of
# the OpenGVLab/InternVL3-*-hf conversions; InternVLProcessor expands each "<IMG_CONTEXT>" to the <img> block)
HF_INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def r1v3_style_template(think_open):
    # a Skywork-R1V3-style template: InternVL2.5's ChatML with its default system turn, the assistant turn opened
    # with `think_open` ("<think>\n" as R1V3 forces it; "<think>" to test the mismatch)
    return ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
            "{{ '<|im_start|>system\n" + INTERNVL_SYSTEM + "<|im_end|>\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n" + think_open.replace("\n", "\\n") +
            "' }}{% endif %}")


_TOKS = {}


def fresh(real_tokenizer_dir, template=None):
    # the tokenizer with this chat template (one object, reused: loading takes seconds)
    if real_tokenizer_dir not in _TOKS:
        _TOKS[real_tokenizer_dir] = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    _TOKS[real_tokenizer_dir].chat_template = template
    return _TOKS[real_tokenizer_dir]


@pytest.fixture
def tok(real_tokenizer_dir):
    return fresh(real_tokenizer_dir)  # no chat template


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


# -----------------------------------------------------------------------------
# the tokenizer

def test_vocabulary_and_added_token_ids(tok):
    for model in ("internvl3_1b", "skywork_r1v3_38b"):
        with open(os.path.join(MODELS, model, "config.json")) as f:
            assert len(tok) == 151674 == json.load(f)["llm_config"]["vocab_size"]
        with open(os.path.join(MODELS, model, "tokenizer_config.json")) as f:
            added = json.load(f)["added_tokens_decoder"]
        assert {t["content"]: int(i) for i, t in added.items()} == {
            t["content"]: tok.convert_tokens_to_ids(t["content"]) for t in added.values()}
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                                                     "<IMG_CONTEXT>", "</box>"]}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<img>": 151665,
                   "</img>": 151666, "<IMG_CONTEXT>": 151667, "</box>": 151673}
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                  "<|endoftext|>", 151643)
    # <think> / </think> are plain text in InternVL3 and R1V3 (no added token): several BPE tokens
    assert len(enc(tok, "<think>")) > 1 and all(i < 151643 for i in enc(tok, "<think></think>"))


def test_loads_with_our_load_tokenizer(real_tokenizer_dir, tok):
    from plumbing.checkpoint import load_tokenizer
    ours = load_tokenizer(real_tokenizer_dir, "scratch")
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nHi 123<|im_end|>"
    assert enc(ours, text) == enc(tok, text) == [151644, 872, 198, 151665, 151667, 151666, 198, 13048, 220, 16, 17,
                                                 18, 151645]


def test_known_qwen_ids(tok):
    # transformers tests/models/qwen2/test_tokenization_qwen2.py test_tokenizer_integration: ids of the real
    # Qwen/Qwen-tokenizer (revision 5909c8222473b2c73b0b73fb054552cd4ef6a8eb), padding left out
    sequences = [
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
        "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
        "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
        "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
        "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
        """```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n"""
        """tokenizer("世界，你好！")```""",
    ]
    expected = [
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707,
         4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321,
         33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320,
         30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897,
         1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949,
         9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912,
         105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138,
         85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    ]
    for s, want in zip(sequences, expected):
        assert tok(s)["input_ids"] == want


def test_digits_split_one_per_token(tok):
    from transformers.models.qwen2 import tokenization_qwen2
    assert QWEN2_PATTERN == tokenization_qwen2.PRETOKENIZE_REGEX  # \p{N}: Qwen2 splits digits one by one
    ids = enc(tok, "x = 1234567890")
    assert [tok.decode([i]) for i in ids[-10:]] == list("1234567890")


def test_byte_level_round_trip_and_agrees_with_tiktoken(tok, real_tokenizer_dir):
    # an independent implementation of the same ranks and regex (tiktoken) gives the same ids; so does the bare
    # tokenizer.json (what tokenizers / vLLM read; transformers' Qwen2Tokenizer rebuilds its pipeline from the vocab)
    import tiktoken
    from tokenizers import Tokenizer
    from tiktoken.load import load_tiktoken_bpe
    ref = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_bpe(qwen_tiktoken_path()),
                            special_tokens={})
    rng = random.Random(0)
    texts = ["你好，世界！😀🎉 👩‍👩‍👧", "  spaces   and\ttabs\r\n\n", "<think>\n\nfoo</think>\n\n\\boxed{2}",
             "Ünïcödé ﬁ 𝔘𝔫𝔦 \u200b \x00\x7f", "I'm we'LL they'RE 3.14159",
             "e\u0301 \u03d2\u0301\u03d2\u0308\u017f\u0307"]  # NFD input: Qwen2 normalises to NFC
    for _ in range(100):
        texts.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x4e00, 0x9fff), rng.randint(0x1f300, 0x1f64f),
                                             rng.randint(0xa0, 0x24f), 10, 32])) for _ in range(rng.randint(1, 30))))
    raw = Tokenizer.from_file(os.path.join(real_tokenizer_dir, "tokenizer.json"))
    for t in texts:
        ids = enc(tok, t)
        assert tok.decode(ids) == unicodedata.normalize("NFC", t), t
        assert ids == ref.encode(unicodedata.normalize("NFC", t)) == raw.encode(t).ids, t


# -----------------------------------------------------------------------------
# the system turn

def test_internvl_system_message_is_conversation_py_s():
    assert TEMPLATE_SYSTEM["internvl2_5"] == INTERNVL_SYSTEM
    assert "书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学" in INTERNVL_SYSTEM


def write_config(d, **cfg):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(d)


def test_resolve_system(tmp_path, real_tokenizer_dir):
    # the original layout names its template: InternVL3 and R1V3 (config/models) -> InternVL's sentence
    assert resolve_system("auto", os.path.join(MODELS, "internvl3_1b"), fresh(real_tokenizer_dir)) == INTERNVL_SYSTEM
    assert resolve_system("auto", os.path.join(MODELS, "skywork_r1v3_38b"), fresh(real_tokenizer_dir)) == INTERNVL_SYSTEM
    # the checkpoint's own system_message wins; explicit settings win over 'auto'
    own = write_config(tmp_path / "own", template="internvl2_5", system_message="Be brief.")
    assert resolve_system("auto", own, fresh(real_tokenizer_dir)) == "Be brief."
    assert resolve_system("", own, fresh(real_tokenizer_dir)) == "" and resolve_system("Hi.", own, fresh(real_tokenizer_dir)) == "Hi."
    with pytest.raises(ValueError, match="template 'vicuna_v1.1' is not one"):
        resolve_system("auto", write_config(tmp_path / "odd", template="vicuna_v1.1"), fresh(real_tokenizer_dir))
    # -hf layout: the chat template decides (transformers' InternVL3-hf template: no system turn)
    hf = write_config(tmp_path / "hf", architectures=["InternVLForConditionalGeneration"])
    assert resolve_system("auto", hf, fresh(real_tokenizer_dir, HF_INTERNVL_TEMPLATE)) == ""
    assert resolve_system("auto", hf, fresh(real_tokenizer_dir, r1v3_style_template("<think>\n"))) == INTERNVL_SYSTEM
    # no template anywhere -> none
    assert resolve_system("auto", "scratch", fresh(real_tokenizer_dir)) == "" and resolve_system("auto", hf, fresh(real_tokenizer_dir)) == ""
    # our export records the system turn the run trained with (save_system), and the next stage's 'auto' finds it
    save_system(hf, INTERNVL_SYSTEM)
    assert resolve_system("auto", hf, fresh(real_tokenizer_dir, HF_INTERNVL_TEMPLATE)) == INTERNVL_SYSTEM
    with open(os.path.join(hf, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["architectures"] == ["InternVLForConditionalGeneration"]
    # a ckpt_* checkpoint: its run's setting, else its run's starting point
    ck = tmp_path / "ckpt_0000010"
    ck.mkdir()
    for run, want in [({"system_prompt": "", "init_from": own}, ""),
                      ({"system_prompt": "auto", "init_from": os.path.join(MODELS, "internvl3_1b")}, INTERNVL_SYSTEM),
                      ({"system_prompt": "auto", "init_from": "resume"}, "Be brief.")]:
        (ck / "state.json").write_text(json.dumps({"step": 10, "config": run, "state": {"tokenizer": own}}))
        assert resolve_system("auto", str(ck), fresh(real_tokenizer_dir)) == want, run


# -----------------------------------------------------------------------------
# our prompt ids = the reference strings

def block(n_tiles=1):
    return "<img>" + "<IMG_CONTEXT>" * (256 * n_tiles) + "</img>"


def test_prompt_ids_match_internvl_conversation(tok):
    # InternVL's chat() (internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py): one image ->
    # '<image>\n' + question; several (InternVL3 README, multi-image): 'Image-1: <image>\nImage-2: <image>\n' +
    # question; then get_conv_template('internvl2_5').get_prompt() and each '<image>' -> <img><IMG_CONTEXT>*256n</img>
    head = "<|im_start|>system\n" + INTERNVL_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    q = "How many red shapes are there?"
    cases = [([1], head + block(1) + "\n" + q + tail),
             ([2, 1], head + "Image-1: " + block(2) + "\nImage-2: " + block(1) + "\n" + q + tail),
             ([], head + q + tail)]
    for n_tiles, ref in cases:
        ours = build_prompt_ids(tok, q, n_tiles, 256, think=False, system=INTERNVL_SYSTEM)
        assert ours == enc(tok, ref), n_tiles
        assert ours[:3] == [151644, 8948, 198] and ours[-3:] == [151644, 77091, 198]  # <|im_start|>system\n, assistant\n
        assert ours.count(151667) == 256 * sum(n_tiles)
        # R1V3: the assistant turn is forced to open with "<think>\n"
        assert build_prompt_ids(tok, q, n_tiles, 256, think=True, system=INTERNVL_SYSTEM) == enc(tok, ref + "<think>\n")


def test_prompt_ids_match_hf_chat_template(real_tokenizer_dir):
    t = fresh(real_tokenizer_dir, HF_INTERNVL_TEMPLATE)
    q = "What is shown?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    text = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace("<IMG_CONTEXT>", block(3), 1)  # InternVLProcessor.replace_image_token
    system = resolve_system("auto", None, t)
    assert system == ""  # the -hf template writes no system turn
    assert build_prompt_ids(t, q, [3], 256, think=False, system=system) == enc(t, text)
    check_chat_template(t, system, think=True)  # and the start-up check agrees (think added by us)
    check_chat_template(t, INTERNVL_SYSTEM, think=False)  # an explicit system message: the template writes it too


# -----------------------------------------------------------------------------
# the start-up check: the checkpoint's chat template wins

def test_check_chat_template_catches_think_without_newline(real_tokenizer_dir):
    # under Qwen2's pre-tokenizer '>' and '>\n' are different tokens: "<think>" and "<think>\n" end differently
    t = fresh(real_tokenizer_dir)
    assert enc(t, "<think>")[-1] != enc(t, "<think>\n")[-1]
    ok = fresh(real_tokenizer_dir, r1v3_style_template("<think>\n"))
    assert check_chat_template(ok, INTERNVL_SYSTEM, think=True, where="R1V3-like") is ok
    with pytest.raises(ValueError, match="think=False"):  # the template forces thinking, the run does not
        check_chat_template(ok, INTERNVL_SYSTEM, think=False)
    with pytest.raises(ValueError, match="system_prompt=''"):  # the template has a default system turn, the run not
        check_chat_template(ok, "", think=True)
    bad = fresh(real_tokenizer_dir, r1v3_style_template("<think>"))
    with pytest.raises(ValueError, match=r"(?s)R1V3-like: the checkpoint's chat template.*<think>'.*<think>\\n'"):
        check_chat_template(bad, INTERNVL_SYSTEM, think=True, where="R1V3-like")
    check_chat_template(bad, INTERNVL_SYSTEM, think=True, check=False)  # the documented override


def test_our_tiny_and_export_templates_pass_the_check(real_tokenizer_dir):
    # data/prepare.py's ChatML template (string content) and the export's (plumbing/hf.py CHAT_TEMPLATE: structured
    # content, "<think>\n" unless enable_thinking=False) render what build_prompt_text builds, thinking or not
    from plumbing import hf
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for template in [chatml] + ([hf.CHAT_TEMPLATE] if hasattr(hf, "CHAT_TEMPLATE") else []):
        t = fresh(real_tokenizer_dir, template)
        for system in ("", INTERNVL_SYSTEM):
            for think in (True, False):
                check_chat_template(t, system, think, where="tiny")
        assert resolve_system("auto", None, t) == ""
    check_chat_template(fresh(real_tokenizer_dir), INTERNVL_SYSTEM, think=True)  # no template: nothing to check


# -----------------------------------------------------------------------------
# SFT: the prompt/response token boundary

@pytest.mark.parametrize("solution,response", [
    ("<think>\nA is 2.\n</think>\n\n\\boxed{2}", "A is 2.\n</think>\n\n\\boxed{2}"),
    ("<think>\n\nA is 2.\n</think>\n\n\\boxed{2}", "\nA is 2.\n</think>\n\n\\boxed{2}"),  # one "\n" is the prompt's
    ("<think>A is 2.</think>\\boxed{2}", "A is 2.</think>\\boxed{2}"),  # the forced "<think>\n" replaces "<think>"
    ("\\boxed{2}", "\\boxed{2}"),  # no thinking: the answer right after the forced "<think>\n"
])
def test_encode_sft_boundary(tok, solution, response):
    q, n_tiles = "How many?", [1]
    item = encode_sft(tok, {"id": "s", "question": q, "solution": solution}, [torch.zeros(1, 3, 8, 8)], 256, 4096,
                      think=True, system=INTERNVL_SYSTEM)
    prompt_text = build_prompt_text(q, n_tiles, 256, True, INTERNVL_SYSTEM)
    n_prompt = item["loss_mask"].index(1)
    # the prompt part is exactly what the model sees at inference; the target decodes to the intended response
    assert item["input_ids"][:n_prompt] == build_prompt_ids(tok, q, n_tiles, 256, True, INTERNVL_SYSTEM)
    assert tok.decode(item["input_ids"][n_prompt:]) == response + IM_END
    assert tok.decode(item["input_ids"]) == prompt_text + response + IM_END  # nothing lost or doubled
    assert sum(item["loss_mask"]) == len(item["input_ids"]) - n_prompt
    joint = enc(tok, prompt_text + response + IM_END)
    if response.startswith("\n"):
        # deliberate difference: tokenized as one string, "<think>\n\n" ends in one '>\n\n' token; ours keeps the
        # prompt's '>\n' and the target starts with its own '\n' (what the model must generate after the prompt)
        assert joint != item["input_ids"]
        assert tok.convert_ids_to_tokens(item["input_ids"][n_prompt - 1:n_prompt + 1]) == [">\u010a", "\u010a"]
        assert ">\u010a\u010a" in tok.convert_ids_to_tokens(joint)
    else:
        assert joint == item["input_ids"]
