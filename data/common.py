"""
Data plumbing shared by sft.py, grpo.py, eval.py and connector_tune.py: JSONL loading and validation,
InternVL image tiling, ChatML prompts with image tokens, SFT loss masks and batch collation.

JSONL format (one sample a line; blank lines are ignored):
    {"id": "sft-000001",                      # str, optional (defaults to "<file stem>-<line>")
     "images": ["images/a.png", ...],         # list[str], paths relative to the JSONL file; may be empty
     "image": "images/a.png",                 #   ... or a single path (use one of "image"/"images")
     "question": "How many red shapes ...?",  # str; may hold "<image>" placeholders, one per image
     "answer": "2",                           # str; the verifiable final answer (a letter if "options")
     "solution": "<think>\\n...\\n</think>\\n\\n\\boxed{2}",  # str, optional: the SFT target
     "options": ["red", "blue", ...],         # list[str], optional: multiple choice, answer is "A", "B", ...
     "domain": "count_color", "difficulty": "normal"}  # str, optional: for per-domain metrics
load_jsonl() returns these dicts with two fields added: "images" (absolute paths, always a list)
and "src" ("file:line", for error messages). Images are opened and verified when the file is
loaded, so a bad image fails at start-up, not in the middle of a run.

Prompt (ChatML as in InternVL / Skywork-R1V3; the assistant turn is forced to open with "<think>\\n"):
    [<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n<img><IMG_CONTEXT>*(tokens_per_tile*n_tiles)</img>\\n
    {question}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n
SFT response: "{reasoning}\\n</think>\\n\\n{answer with \\boxed{..}}<|im_end|>"; the loss covers only the response.
The system turn: resolve_system (the scripts' system_prompt='auto' follows the checkpoint: InternVL3 / R1V3 ->
InternVL's system message); check_chat_template compares our prompt with the checkpoint's chat template at start-up.
"""
import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, THINK_START, THINK_END]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MC_INSTRUCTION = "Answer with the option's letter from the given choices."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# -----------------------------------------------------------------------------
# JSONL loading and validation

def check_sample(rec, path, lineno):
    """Validates one parsed record in place (adds "images" as absolute paths, "src", "id").
    Returns None if fine, else (reason category, message)."""
    if not isinstance(rec, dict):
        return "not an object", f"expected a JSON object, got {type(rec).__name__}"
    for key in ("id", "question", "answer", "solution", "domain", "difficulty", "image"):
        if key in rec and not isinstance(rec[key], str):
            return "wrong type", f"field '{key}' must be a string, got {type(rec[key]).__name__}"
    for key in ("images", "options"):
        if key in rec and not (isinstance(rec[key], list) and all(isinstance(x, str) for x in rec[key])):
            return "wrong type", f"field '{key}' must be a list of strings"
    if "image" in rec and "images" in rec:
        return "wrong type", "give either 'image' or 'images', not both"
    if "options" in rec:
        if not 2 <= len(rec["options"]) <= len(LETTERS):
            return "bad options", f"'options' must hold 2..26 entries, got {len(rec['options'])}"
        if "answer" in rec and rec["answer"] not in LETTERS[:len(rec["options"])]:
            return "bad options", f"answer {rec['answer']!r} is not an option letter A..{LETTERS[len(rec['options']) - 1]}"
    rel = rec.pop("image", None)
    rel = [rel] if rel is not None else rec.get("images", [])
    n_ph = rec.get("question", "").count("<image>")
    if n_ph and n_ph != len(rel):
        return "image placeholders", f"question has {n_ph} '<image>' placeholders but {len(rel)} images"
    rec["images"] = []
    for p in rel:
        full = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), p))
        if not os.path.isfile(full):
            return "missing image", f"image not found: {p} ({full})"
        try:
            with Image.open(full) as im:
                im.verify()  # checks the file's structure and checksums without decoding it all
        except Exception as e:
            return "corrupt image", f"cannot read image {p}: {type(e).__name__}: {e}"
        rec["images"].append(full)
    rec.setdefault("id", f"{os.path.splitext(os.path.basename(path))[0]}-{lineno}")
    rec["src"] = f"{path}:{lineno}"
    return None

def load_jsonl(path, require=("question", "answer"), skip_bad=False):
    """Reads a JSONL file of samples (format in the module docstring). A bad line raises
    ValueError("path:line: problem"); with skip_bad=True it is skipped and counted, and a summary is printed."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    samples, skipped = [], Counter()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                bad = None
            except json.JSONDecodeError as e:
                rec, bad = None, ("malformed JSON", f"malformed JSON: {e}")
            if bad is None:
                bad = check_sample(rec, path, lineno)
            if bad is None:
                missing = [k for k in require if k not in rec]
                bad = ("missing field", f"missing field(s): {', '.join(missing)}") if missing else None
            if bad is None:
                samples.append(rec)
            elif skip_bad:
                skipped[bad[0]] += 1
            else:
                raise ValueError(f"{path}:{lineno}: {bad[1]}")
    if skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
        print(f"{path}: skipped {sum(skipped.values())} samples: {reasons}")
    if not samples:
        raise ValueError(f"{path}: no samples" + (" (empty file)" if not skipped else " left after skipping bad ones"))
    return samples

# -----------------------------------------------------------------------------
# Image preprocessing: InternVL dynamic tiling (InternVL 1.5, arXiv 2404.16821 section 3.2;
# same logic as dynamic_preprocess in OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py)

def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    # grid (cols, rows) whose aspect ratio is closest; on a tie take the larger grid if the image has
    # more than half the pixels that grid needs
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best

def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    """PIL image -> list of image_size x image_size PIL tiles (row-major), plus a thumbnail if >1 tile."""
    w, h = image.size
    target_ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                            for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    cols, rows = find_closest_aspect_ratio(w / h, target_ratios, w, h, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles

def load_image(path_or_pil, image_size, max_tiles, use_thumbnail):
    """Path or PIL image -> FloatTensor (n_tiles, 3, image_size, image_size), ImageNet-normalised."""
    img = Image.open(path_or_pil) if isinstance(path_or_pil, (str, os.PathLike)) else path_or_pil
    img = img.convert("RGB")
    tiles = dynamic_preprocess(img, 1, max_tiles, image_size, use_thumbnail)
    x = torch.from_numpy(np.stack([np.asarray(t, dtype=np.float32) for t in tiles])) / 255.0  # (n, H, W, 3)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)

def load_images(sample, image_size, max_tiles, use_thumbnail):
    """All images of a loaded sample -> list of (n_i, 3, H, W) tensors; errors name the sample."""
    out = []
    for p in sample.get("images", []):
        try:
            out.append(load_image(p, image_size, max_tiles, use_thumbnail))
        except Exception as e:
            raise ValueError(f"{sample.get('src', sample.get('id'))}: cannot load image {p}: {e}") from e
    return out

# -----------------------------------------------------------------------------
# Prompts

def format_question(question, options=None):
    # multiple choice: "A. red\nB. blue ..." under the question, then an instruction
    if not options:
        return question
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{opts}\n{MC_INSTRUCTION}"

def build_prompt_text(question, n_tiles, tokens_per_tile, think=True, system=None, options=None):
    """The prompt as a string (see module docstring). n_tiles: one entry per image."""
    blocks = [IMG_START + IMG_CONTEXT * (tokens_per_tile * n) + IMG_END for n in n_tiles]
    q = format_question(question, options)
    n_ph = q.count("<image>")
    if n_ph:  # InternVL: "<image>" placeholders are replaced, in order, by the image blocks
        if n_ph != len(blocks):
            raise ValueError(f"question has {n_ph} '<image>' placeholders but {len(blocks)} images")
        for b in blocks:
            q = q.replace("<image>", b, 1)
        user = q
    elif len(blocks) == 1:
        user = blocks[0] + "\n" + q
    else:
        user = "".join(f"Image-{i + 1}: {b}\n" for i, b in enumerate(blocks)) + q
    text = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    text += f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    return text + (THINK_START + "\n" if think else "")

def build_prompt_ids(tok, question, n_tiles, tokens_per_tile, think=True, system=None, options=None):
    """-> list[int]. Raises ValueError if the tokenizer does not keep <IMG_CONTEXT> as one token per slot."""
    text = build_prompt_text(question, n_tiles, tokens_per_tile, think, system, options)
    ids = tok.encode(text, add_special_tokens=False)
    want, got = tokens_per_tile * sum(n_tiles), ids.count(tok.convert_tokens_to_ids(IMG_CONTEXT))
    if got != want:
        raise ValueError(f"prompt has {got} {IMG_CONTEXT} tokens, expected {want} = {tokens_per_tile} x {sum(n_tiles)} tiles")
    return ids

# The system turn. InternVL's conversation templates by the name a checkpoint's config.json gives ("template"), with
# their default system message: OpenGVLab/InternVL internvl_chat/internvl/conversation.py,
# register_conv_template(Conversation(name='internvl2_5', ...)) (InternVL2.5 and InternVL3; its format, ChatML with
# "<|im_end|>\n" after each turn, is the one build_prompt_text writes). Note the fullwidth comma and full stop.
TEMPLATE_SYSTEM = {
    "internvl2_5": "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
}


def _render(tok, messages, think=True):
    # enable_thinking: templates with a thinking switch (Qwen3-style, our exports') follow the run's think
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=think)


def _template_default_system(tok, where):
    # the system turn a chat template writes when the messages have none ("" if none)
    try:
        try:
            text = _render(tok, [{"role": "user", "content": "Hi"}])
        except Exception:
            text = _render(tok, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    except Exception as e:
        raise ValueError(f"{where}: cannot render the tokenizer's chat template: {type(e).__name__}: {e}") from e
    head = f"{IM_START}system\n"
    return text[len(head):text.index(IM_END)] if text.startswith(head) and IM_END in text else ""


def resolve_system(system_prompt, model_dir, tok=None):
    """The system message the prompts carry ('' = no system turn). system_prompt is the scripts' setting: 'auto'
    follows the checkpoint, '' turns the system turn off, any other text is used as is. 'auto', in order:
      1. model_dir/config.json's "system_message", if set;
      2. its "template" (the original InternVLChatModel / SkyworkR1VChatModel layout): that template's default
         system message, TEMPLATE_SYSTEM (InternVL3: the InternVL sentence); an unknown name raises;
      3. else (a -hf layout, our exports, our tiny model) the tokenizer's chat template: the system turn it writes
         by default (transformers' InternVL3-hf template, plumbing/hf.py's, data/synth/tokenizer's: none);
      4. else none.
    model_dir: an HF directory, a ckpt_* checkpoint (its run's system_prompt when that was not 'auto', else its run's
    init_from directory, else the tokenizer directory it recorded), or None / 'scratch' (no system turn).
    tok: the run's tokenizer (step 3)."""
    if system_prompt != "auto":
        return system_prompt or ""
    if not model_dir or not os.path.isdir(model_dir):
        return _template_default_system(tok, "tokenizer") if getattr(tok, "chat_template", None) else ""
    state = os.path.join(model_dir, "state.json")
    if os.path.isfile(state) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(state) as f:
            meta = json.load(f)
        run, saved = meta.get("config", {}), meta.get("state", {})
        if run.get("system_prompt", "") != "auto":  # what that run used ('' before 'auto' existed)
            return run.get("system_prompt", "")
        src = next((d for d in (saved.get("init_from"), run.get("init_from"), saved.get("tokenizer"))
                    if d and d not in ("scratch", "resume") and os.path.isdir(d)), None)
        return resolve_system("auto", src, tok)
    cfg = {}
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    if cfg.get("system_message"):
        return cfg["system_message"]
    if cfg.get("template"):
        if cfg["template"] not in TEMPLATE_SYSTEM:
            raise ValueError(f"{model_dir}/config.json: template {cfg['template']!r} is not one data/common.py knows "
                             f"({', '.join(TEMPLATE_SYSTEM)}): set system_prompt explicitly ('' for none)")
        return TEMPLATE_SYSTEM[cfg["template"]]
    if getattr(tok, "chat_template", None):
        return _template_default_system(tok, model_dir)
    return ""


def save_system(model_dir, system):
    """Records a run's system message in its export's config.json ("system_message", which resolve_system reads
    first), so that the next stage's 'auto' uses what the model was trained with; an export's chat template
    (plumbing/hf.py) writes no system turn of its own. No-op for '' (no system turn: the template's default)."""
    if not system:
        return
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["system_message"] = system
    with open(path + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def _short(text, tokens_per_tile):
    return repr(text.replace(IMG_CONTEXT * tokens_per_tile, f"{IMG_CONTEXT}*{tokens_per_tile}"))


def check_chat_template(tok, system, think, where="", check=True, tokens_per_tile=256):
    """The checkpoint's chat template wins: renders one sample (a user turn with one image and a question,
    add_generation_prompt=True, enable_thinking=think) with the tokenizer's chat template and compares it with
    build_prompt_text's for the same input (equal text, hence equal ids); raises ValueError naming `where` (the
    checkpoint) and showing both. The image: the template's "<IMG_CONTEXT>" or "<image>" marker is replaced by the
    <img> block, as InternVL's processor / chat() do. A template that opens the assistant turn with "<think>" must
    match ours byte for byte: under Qwen2's pre-tokenizer ">" and ">\\n" are different tokens, so "<think>" vs our
    forced "<think>\\n" is a different prompt (Skywork-R1V3 forces "<think>\\n"); with think=False a template
    that still opens "<think>" is a mismatch too. A template without "<think>" is compared with ours before the
    forced "<think>\\n". No chat template, or check=False (the scripts' check_template=False): nothing to check.
    Returns tok."""
    if not check or not getattr(tok, "chat_template", None):
        return tok
    q, block = "How many?", IMG_START + IMG_CONTEXT * tokens_per_tile + IMG_END
    msgs = [{"role": "system", "content": system}] if system else []
    try:  # structured content (-hf templates), else a string with InternVL's "<image>\n" placeholder
        text = _render(tok, msgs + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                       think)
        if IMG_CONTEXT not in text and "<image>" not in text:
            raise TypeError("no image marker")
    except Exception:
        try:
            text = _render(tok, msgs + [{"role": "user", "content": "<image>\n" + q}], think)
        except Exception as e:
            raise ValueError(f"{where or tok.name_or_path}: cannot render its chat template: {type(e).__name__}: {e}"
                             " (check_template=False skips this check)") from e
    marker = IMG_CONTEXT if IMG_CONTEXT in text else "<image>"
    text = text.replace(marker, block, 1)
    if THINK_START not in text[text.rfind(IM_START):]:  # the template leaves the thinking to us
        text += THINK_START + "\n" if think else ""
    ours = build_prompt_text(q, [1], tokens_per_tile, think, system)
    if text != ours:
        a, b = _short(text, tokens_per_tile), _short(ours, tokens_per_tile)
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(
            f"{where or tok.name_or_path}: the checkpoint's chat template renders a different prompt than "
            f"data/common.py builds (system_prompt={system!r}, think={think}); they differ from character {i} "
            f"of:\n  chat template: {a}\n  ours:          {b}\n"
            "Set system_prompt/think to match it, or check_template=False to run with ours anyway.")
    return tok


def encode_sft(tok, sample, images_tensors, tokens_per_tile, max_len, think=True, system=None):
    """One SFT example. images_tensors: list of (n_i,3,H,W) (may be empty).
    Returns dict(input_ids, loss_mask, pixel_values (N,3,H,W)|None, n_tiles list per image).
    loss_mask[t] = 1 means token t is a target, predicted from position t-1 (the trainer shifts);
    it is 1 exactly on the response tokens, the closing <|im_end|> included.
    Prompt and response are tokenized separately, deliberately: at inference the model sees exactly the prompt ids
    and generates from there, so the target is what it should generate after them. Tokenizing the joined text can
    differ at the seam (Qwen2's pre-tokenizer makes "<think>\n\n" end in one ">\n\n" token; here the prompt ends
    in ">\n" and the response starts with its own "\n"), but no character is lost or added, except the forced
    opening: with think, a leading "<think>" and one "\n" after it are the prompt's "<think>\n" ("<think>\n\nA" ->
    prompt "...<think>\n" + response "\nA"; "<think>A" -> "...<think>\n" + "A"); a solution without "<think>" follows
    the forced "<think>\n" as it is."""
    where = sample.get("src", f"sample {sample.get('id')}")
    if "solution" not in sample:
        raise ValueError(f"{where}: sample {sample.get('id')} has no 'solution' to train on")
    n_tiles = [t.shape[0] for t in images_tensors]
    try:
        prompt = build_prompt_ids(tok, sample["question"], n_tiles, tokens_per_tile, think, system, sample.get("options"))
    except ValueError as e:
        raise ValueError(f"{where}: sample {sample.get('id')}: {e}") from e
    resp = sample["solution"]
    if think and resp.startswith(THINK_START):  # the prompt already ends with the forced "<think>\n"
        resp = resp[len(THINK_START):].removeprefix("\n")
    resp_ids = tok.encode(resp + IM_END, add_special_tokens=False)
    ids = prompt + resp_ids
    if len(ids) > max_len:
        raise ValueError(f"{where}: sample {sample.get('id')} is too long: {len(ids)} tokens > max_len {max_len}")
    return dict(input_ids=ids, loss_mask=[0] * len(prompt) + [1] * len(resp_ids),
                pixel_values=torch.cat(images_tensors) if images_tensors else None, n_tiles=n_tiles)

# -----------------------------------------------------------------------------
# Data set for the training scripts: every sample is validated and measured at start-up, but only light metadata is
# kept (the line's place in the file, its token length and tile count); a sample's images are decoded when a batch
# asks for it, for this rank's samples only (in DataLoader worker processes, or in the training process)

class SFTData(torch.utils.data.Dataset):
    """The valid SFT samples of a JSONL file (load_sft_data builds it): len(), data[i] -> one encoded sample (the
    encode_sft dict plus "id" and "index" = i; its line read again, its images decoded now), data[a:b] -> a list,
    iteration. Per sample, kept: byte offset and line number in the file, token length (`lengths`), total tiles
    (`tiles`), domain (`domains`); a few dozen bytes a sample, nothing of its text or pixels.
    rows: which of the file's valid samples, in which order (repeats allowed: domain balancing); subset() picks."""

    def __init__(self, path, tok, cfg, max_len, think, system, meta, names, rows=None):
        self.path, self.tok, self.cfg, self.max_len, self.think, self.system = path, tok, cfg, max_len, think, system
        self.meta, self.names = meta, names  # meta: numpy arrays over the valid samples; names: domain strings
        self.rows = np.arange(len(meta["offset"])) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = int(self.rows[i])
        lineno = int(self.meta["lineno"][r])
        with open(self.path, "rb") as f:
            f.seek(int(self.meta["offset"][r]))
            line = f.readline()
        try:  # the line was valid at start-up; anything else now means the file changed under the run
            rec = json.loads(line)
            bad = check_sample(rec, self.path, lineno)
        except ValueError as e:
            bad = ("", str(e))
        if bad is not None:
            raise ValueError(f"{self.path}:{lineno}: {bad[1]} (the file changed since start-up?)")
        imgs = load_images(rec, self.cfg.image_size, self.cfg.max_tiles, self.cfg.use_thumbnail)
        item = encode_sft(self.tok, rec, imgs, self.cfg.tokens_per_tile, self.max_len, self.think, self.system)
        if len(item["input_ids"]) != self.meta["length"][r]:
            raise ValueError(f"{rec['src']}: {len(item['input_ids'])} tokens now, {self.meta['length'][r]} at start-up "
                             f"(the file or an image changed since?)")
        return dict(item, id=rec["id"], index=i)

    def subset(self, rows):
        """The samples at positions `rows` of this one (in that order, repeats allowed)."""
        return SFTData(self.path, self.tok, self.cfg, self.max_len, self.think, self.system, self.meta, self.names,
                       self.rows[np.asarray(rows, dtype=np.int64)])

    @property
    def lengths(self):  # tokens per sample (prompt + response)
        return self.meta["length"][self.rows]

    @property
    def tiles(self):  # image tiles per sample, all its images together
        return self.meta["tiles"][self.rows]

    @property
    def domains(self):  # the JSONL 'domain' of each sample ('' when absent)
        return [self.names[c] for c in self.meta["domain"][self.rows]]


def load_sft_data(path, tok, cfg, max_len, think=True, system=None, skip_bad=False):
    """JSONL -> SFTData. Every line is checked now, one at a time (JSON, fields, images open and verify, the token
    length from the image sizes in the file headers, <= max_len), so a bad sample raises ValueError("path:line:
    problem") at start-up, or with skip_bad is counted and reported; no pixels are decoded and no text is kept.
    cfg: anything with image_size, max_tiles, use_thumbnail, tokens_per_tile (a VLMConfig)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    cols = {k: [] for k in ("offset", "lineno", "length", "tiles", "domain")}
    names, skipped, off = {}, Counter(), 0
    with open(path, "rb") as f:  # bytes: the offset of every line is known exactly
        for lineno, line in enumerate(f, 1):
            start, off = off, off + len(line)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:  # json.JSONDecodeError, or bytes that are not UTF-8
                rec, bad = None, ("malformed JSON", f"malformed JSON: {e}")
            else:
                bad = check_sample(rec, path, lineno)
            if bad is None:
                missing = [k for k in ("question", "answer", "solution") if k not in rec]
                bad = ("missing field", f"missing field(s): {', '.join(missing)}") if missing else None
            if bad is None:
                try:
                    n_tiles = []
                    for p in rec["images"]:
                        with Image.open(p) as im:  # the header only: the size, no pixels
                            n_tiles.append(count_tiles(*im.size, cfg.max_tiles, cfg.image_size, cfg.use_thumbnail))
                    # encode_sft reads only the tile counts of its image tensors here: (n, 0) stand-ins hold no pixels
                    ids = encode_sft(tok, rec, [torch.empty(n, 0) for n in n_tiles], cfg.tokens_per_tile, max_len,
                                     think, system)["input_ids"]
                except ValueError as e:
                    if not skip_bad:
                        raise
                    skipped["too long" if "too long" in str(e) else "encode error"] += 1
                    continue
                for k, v in zip(cols, (start, lineno, len(ids), sum(n_tiles),
                                       names.setdefault(rec.get("domain", ""), len(names)))):
                    cols[k].append(v)
            elif skip_bad:
                skipped[bad[0]] += 1
            else:
                raise ValueError(f"{path}:{lineno}: {bad[1]}")
    if skipped:
        print(f"{path}: skipped {sum(skipped.values())} samples: " + ", ".join(f"{k}: {v}" for k, v in skipped.most_common()))
    if not cols["offset"]:
        raise ValueError(f"{path}: no samples" + (" left to train on after skipping bad ones" if skipped else " (empty file)"))
    meta = {k: np.asarray(v, dtype=np.int64 if k == "offset" else np.int32) for k, v in cols.items()}
    return SFTData(path, tok, cfg, max_len, think, system, meta, list(names))


def epoch_order(n, seed, epoch):
    """The order of n samples in an epoch: one permutation per (seed, epoch), so (epoch, position) is a data position."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


class RankBatches(torch.utils.data.Sampler):
    """This rank's micro-batches (lists of sample indices), step after step, from the data position (epoch, pos),
    endless: each step takes the next global_batch samples of the epoch's order (epoch_order; a new epoch when fewer
    than global_batch are left: the remainder is dropped), this rank's share is every world_size-th from `rank`, and
    its micro-batches every grad_accum-th of that. The DataLoader's workers run ahead of the training loop (prefetch);
    the loop keeps the position it has reached itself (step()), which is what a checkpoint saves."""

    def __init__(self, n, global_batch, rank, world_size, grad_accum, seed, epoch=0, pos=0):
        if n < global_batch:
            raise ValueError(f"{n} samples is less than one global batch of {global_batch}")
        self.n, self.gb, self.rank, self.ws, self.ga, self.seed = n, global_batch, rank, world_size, grad_accum, seed
        self.epoch, self.pos, self._order = epoch, pos, (None, None)

    def order(self, epoch):  # epoch_order, computed once an epoch
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n, self.seed, epoch))
        return self._order[1]

    def step(self, epoch, pos):
        """-> (epoch, pos after the step, the step's global batch of indices) for the step at data position (epoch, pos)."""
        if pos + self.gb > self.n:
            epoch, pos = epoch + 1, 0
        return epoch, pos + self.gb, self.order(epoch)[pos:pos + self.gb]

    def micro(self, idx):
        """A global batch -> this rank's grad_accum micro-batches."""
        mine = idx[self.rank::self.ws]
        return [mine[k::self.ga] for k in range(self.ga)]

    def __iter__(self):
        epoch, pos = self.epoch, self.pos
        while True:
            epoch, pos, idx = self.step(epoch, pos)
            yield from self.micro(idx)


def collate(items, pad_id):
    """-> dict(input_ids (B,T) long right-padded with pad_id, loss_mask (B,T) long (0 on pads),
    pixel_values (N_tiles_total,3,H,W) or None, n_tiles list[int] total tiles per sample, index list (each
    item's "index", None without))."""
    T = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(items), T), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[b, :n] = torch.tensor(it["input_ids"])
        loss_mask[b, :n] = torch.tensor(it["loss_mask"])
    pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    return dict(input_ids=input_ids, loss_mask=loss_mask, pixel_values=torch.cat(pix) if pix else None,
                n_tiles=[sum(it["n_tiles"]) for it in items], index=[it.get("index") for it in items])


def token_batches(lengths, max_tokens=0, max_rows=None):
    """Micro-batches by a token budget (grpo.py; for sft.py too): consecutive runs of positions 0..len(lengths)-1, in
    the order given (sort by length first: less padding), each with as many rows as keep its padded size (rows x its
    longest length) <= max_tokens, at most max_rows rows, and at least one row (a row longer than the budget goes
    alone). max_tokens=0: max_rows rows each (no budget). Returns a list of lists of positions."""
    out, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        full = max_rows is not None and len(cur) >= max_rows
        if cur and (full or (max_tokens > 0 and (len(cur) + 1) * max(longest, n) > max_tokens)):
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return out + ([cur] if cur else [])

# -----------------------------------------------------------------------------
# Prompts for generation (grpo.py, eval.py, entropy.py)

def encode_prompt(tok, sample, cfg, think=True, system=None):
    """A loaded sample -> (input_ids list[int], pixel_values (N,3,H,W) | None), the pair sampler.generate takes.
    cfg: anything with image_size, max_tiles, use_thumbnail, tokens_per_tile (a VLMConfig)."""
    imgs = load_images(sample, cfg.image_size, cfg.max_tiles, cfg.use_thumbnail)
    try:
        ids = build_prompt_ids(tok, sample["question"], [t.shape[0] for t in imgs], cfg.tokens_per_tile, think,
                               system, sample.get("options"))
    except ValueError as e:
        raise ValueError(f"{sample.get('src', sample.get('id'))}: {e}") from e
    return ids, (torch.cat(imgs) if imgs else None)


CRITICAL_WORDS = ("Wait", "Alternatively", "Hmm", "But wait")  # R1V3 section 5's reasoning-initiation tokens


def critical_token_ids(tok, words=CRITICAL_WORDS):
    """The first token of each word in the variants a tokenizer produces mid-text: with and without a leading
    space or newline, capitalised or not. Returns {token id: word}. A word that splits into several tokens is
    represented by its first token (e.g. "Altern" of "Alternatively"); ids shared by different words keep the
    first word listed. Multi-word entries ("But wait") are skipped: their first token ("But") is not critical
    by itself, and the single word ("Wait") is listed anyway. Used to ban tokens (the "no-wait" mode)."""
    out = {}
    for w in words:
        if " " in w:
            continue
        for v in {w, w.lower(), w.capitalize()}:
            for text in (v, " " + v, "\n" + v):
                ids = tok.encode(text, add_special_tokens=False)
                if text[0] in " \n" and len(ids) > 1 and tok.decode(ids[:1]).strip() == "":
                    ids = ids[1:]  # the space/newline became its own token: the word starts at the next one
                first = tok.decode(ids[:1]).strip() if ids else ""
                if len(first) >= min(3, len(v)) and v.startswith(first):  # not a 1-2 letter fragment like "w"
                    out.setdefault(ids[0], w)
    return out

# -----------------------------------------------------------------------------
# Token ids the generation code needs (written once, used by the sampler CLI, grpo.py, eval.py, entropy.py)


def _ids(tok, tokens):
    ids = {tok.convert_tokens_to_ids(t) for t in tokens}
    return sorted(i for i in ids if i is not None and (i != tok.unk_token_id or tok.unk_token in tokens))


def stop_token_ids(tok):
    """The ids that end a response (the one stop rule): the chat template's <|im_end|>, <|endoftext|>, and the
    tokenizer's own eos token."""
    return _ids(tok, [IM_END, "<|endoftext|>"] + ([tok.eos_token] if tok.eos_token else []))


def vision_token_ids(tok):
    """<img>, </img> and <IMG_CONTEXT>: rollouts never sample them (a sampled <IMG_CONTEXT> has no image features,
    and the training forward would refuse the sequence)."""
    return _ids(tok, [IMG_START, IMG_END, IMG_CONTEXT])


def token_pieces(tok, ids):
    """The text each token adds to the decoded response (special tokens kept), for the viewer: the pieces
    concatenate to the text. A token that ends inside a multi-byte character adds '' and the one completing it
    adds the character. Decodes a short window per token (not the whole prefix), so long responses stay cheap."""
    pieces, start, prev = [], 0, ""
    for i in range(len(ids)):
        if i - start > 8:  # slide the window; the text before it is already in pieces
            start, prev = i - 4, tok.decode(ids[i - 4:i], skip_special_tokens=False)
        text = tok.decode(ids[start:i + 1], skip_special_tokens=False)
        if text.endswith("\ufffd") or not text.startswith(prev):
            pieces.append("")
            continue
        pieces.append(text[len(prev):])
        prev = text
    return pieces


def prompt_length(tok, sample, cfg, think=True, system=None):
    """The prompt's token count without decoding its images (their sizes come from the file headers): grpo.py checks
    every RL prompt against the context length at start-up without holding any pixels."""
    n_tiles = []
    for p in sample.get("images", []):
        with Image.open(p) as im:
            w, h = im.size
        n_tiles.append(count_tiles(w, h, cfg.max_tiles, cfg.image_size, cfg.use_thumbnail))
    text = build_prompt_text(sample["question"], n_tiles, cfg.tokens_per_tile, think, system, sample.get("options"))
    return len(tok.encode(text, add_special_tokens=False))


def count_tiles(w, h, max_tiles, image_size, use_thumbnail):
    """The number of tiles dynamic_preprocess makes of a w x h image."""
    ratios = sorted({(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_tiles}, key=lambda x: x[0] * x[1])
    cols, rows = find_closest_aspect_ratio(w / h, ratios, w, h, image_size)
    return cols * rows + (1 if use_thumbnail and cols * rows != 1 else 0)
