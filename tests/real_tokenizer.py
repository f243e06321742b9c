"""
The real InternVL3 / Skywork-R1V3 tokenizer, built offline for the tests: Qwen's BPE ranks (151,643 byte-level
tokens, the file Qwen ships as qwen.tiktoken) + InternVL3's 31 added tokens at their ids (151643-151673, from
config/models/internvl3_1b/tokenizer_config.json) = 151,674 ids, the LLM's vocab_size.

Where the ranks come from: the PyPI package `dashscope` (Alibaba's Qwen API client) ships
dashscope/resources/qwen.tiktoken. If dashscope is installed its copy is used; else the 2.0.2 wheel is downloaded
with `pip download --no-deps` (nothing is installed) and that one file is extracted into .cache/qwen_tokenizer/.
Either way its sha256 is checked. Offline without the file: put qwen.tiktoken at that path.

Conversion: transformers' TikTokenConverter (BPE vocab + merges from the ranks, byte-level pre/decoding) with Qwen2's
pre-tokenizer regex (digits one by one: \\p{N}, not tiktoken's default \\p{N}{1,3}) and Qwen2's NFC normaliser, the
same pipeline transformers' Qwen2Tokenizer builds (models/qwen2/tokenization_qwen2.py).

    from real_tokenizer import build_internvl3_tokenizer
    tok = AutoTokenizer.from_pretrained(build_internvl3_tokenizer(tmp_dir))
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "qwen_tokenizer")
DASHSCOPE = "dashscope==2.0.2"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # dashscope 2.0.2's copy
N_RANKS = 151643
# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX (tests/test_prompts.py checks they agree)
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
MODEL_CONFIGS = os.path.join(ROOT, "config", "models")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def qwen_tiktoken_path():
    """Path of a verified qwen.tiktoken: installed dashscope's, else the cached copy, else extracted from the
    dashscope wheel that pip downloads (into .cache/qwen_tokenizer/). Raises RuntimeError saying what to do."""
    spec = importlib.util.find_spec("dashscope")
    if spec is not None and spec.origin:
        p = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
        if os.path.isfile(p) and _sha256(p) == QWEN_TIKTOKEN_SHA256:
            return p
    path = os.path.join(CACHE, "qwen.tiktoken")
    if os.path.isfile(path) and _sha256(path) == QWEN_TIKTOKEN_SHA256:
        return path
    os.makedirs(CACHE, exist_ok=True)
    wheel = os.path.join(CACHE, "dashscope-2.0.2-py3-none-any.whl")
    if not os.path.isfile(wheel):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DASHSCOPE,
                            "-d", CACHE], capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(wheel):
            raise RuntimeError(
                f"tests/real_tokenizer.py: cannot get Qwen's BPE ranks: `pip download --no-deps {DASHSCOPE}` failed "
                f"(offline?). Put dashscope's resources/qwen.tiktoken (sha256 {QWEN_TIKTOKEN_SHA256}) at {path}, or "
                f"pip install dashscope.\n{r.stderr.strip()[-2000:]}")
    with zipfile.ZipFile(wheel) as z:
        data = z.read("dashscope/resources/qwen.tiktoken")
    got = hashlib.sha256(data).hexdigest()
    if got != QWEN_TIKTOKEN_SHA256:
        raise RuntimeError(f"tests/real_tokenizer.py: {wheel}: qwen.tiktoken has sha256 {got}, "
                           f"expected {QWEN_TIKTOKEN_SHA256}")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: parallel test processes never see half a file
    return path


def build_internvl3_tokenizer(out_dir, model="internvl3_1b", chat_template=None):
    """Writes tokenizer.json + tokenizer_config.json of InternVL3's tokenizer (added tokens from
    config/models/<model>/tokenizer_config.json) into out_dir and returns out_dir, loadable by
    AutoTokenizer.from_pretrained and plumbing.checkpoint.load_tokenizer. chat_template: a jinja string stored in
    tokenizer_config.json, or None for none (the original-layout InternVL3 flow builds prompts with
    conversation.py, not with a chat template)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with open(os.path.join(MODEL_CONFIGS, model, "tokenizer_config.json")) as f:
        ref = json.load(f)
    added = sorted((int(i), t) for i, t in ref["added_tokens_decoder"].items())
    tk = TikTokenConverter(vocab_file=qwen_tiktoken_path(), pattern=QWEN2_PATTERN).converted()
    tk.normalizer = normalizers.NFC()  # as Qwen2Tokenizer
    if tk.get_vocab_size() != N_RANKS:
        raise RuntimeError(f"tests/real_tokenizer.py: {tk.get_vocab_size()} BPE tokens, expected {N_RANKS}")
    for i, t in added:  # one at a time, in id order: each gets the next id
        tk.add_tokens([AddedToken(t["content"], special=t["special"], normalized=t["normalized"],
                                  lstrip=t["lstrip"], rstrip=t["rstrip"], single_word=t["single_word"])])
        if tk.token_to_id(t["content"]) != i:
            raise RuntimeError(f"tests/real_tokenizer.py: {t['content']} got id {tk.token_to_id(t['content'])}, "
                               f"expected {i}")
    os.makedirs(out_dir, exist_ok=True)
    tk.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = dict(tokenizer_class=ref.get("tokenizer_class", "Qwen2Tokenizer"), added_tokens_decoder=ref["added_tokens_decoder"],
               bos_token=None, eos_token=ref.get("eos_token", "<|im_end|>"), pad_token=ref.get("pad_token", "<|endoftext|>"),
               unk_token=None, model_max_length=ref.get("model_max_length", 16384), clean_up_tokenization_spaces=False,
               split_special_tokens=False, errors="replace")
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return out_dir


if __name__ == "__main__":  # python tests/real_tokenizer.py OUT_DIR
    print(build_internvl3_tokenizer(sys.argv[1] if len(sys.argv) > 1 else os.path.join(CACHE, "internvl3")))
