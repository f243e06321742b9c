"""
The inputs of dev/rehearsal.sh: a random-weight checkpoint at InternVL3-1B's real configuration, in the original
InternVLChatModel layout the hub repo ships (config/models/internvl3_1b/config.json, bf16 safetensors under the
original tensor names), with the real Qwen2.5 / InternVL3 tokenizer (tests/real_tokenizer.py rebuilds it offline
from the BPE ranks in the `dashscope` package), and a handful of real-size images (896 x 448: 2 tiles + the
thumbnail = 3 x 256 image tokens each) with SFT, RL and validation JSONL files.

    python dev/rehearsal_setup.py DIR      # writes DIR/model, DIR/data; about 1 minute and 8 GB on 2 cores
"""
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from model import VLM  # noqa: E402
from plumbing.hf import hf_names, load_config  # noqa: E402
from tests.real_tokenizer import build_internvl3_tokenizer  # noqa: E402

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60)}


def write_model(d):
    src = os.path.join(ROOT, "config", "models", "internvl3_1b")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), d)
    build_internvl3_tokenizer(d)  # tokenizer.json + tokenizer_config.json, the real ids
    cfg, layout = load_config(d)
    assert layout == "original", layout
    torch.manual_seed(0)
    model = VLM(cfg)  # random weights at the real shapes (0.94B parameters)
    sd = {}
    for name, p in model.state_dict().items():
        if cfg.tie_embeddings and name == "llm.lm_head.weight":
            continue
        (hf,) = hf_names(name, cfg, "original")
        sd[hf] = p.to(torch.bfloat16).contiguous()
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    n = sum(p.numel() for p in model.parameters())
    print(f"{d}: {n / 1e9:.3f}B parameters, {len(sd)} tensors (original layout, bf16)")


def write_data(d, n=6):
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        counts = {c: 1 + (i + k) % 3 for k, c in enumerate(COLORS)}
        img = Image.new("RGB", (896, 448), (245, 245, 240))
        draw = ImageDraw.Draw(img)
        x = 20
        for c, k in counts.items():
            for _ in range(k):
                draw.ellipse([x, 150, x + 80, 230], fill=COLORS[c])
                x += 100
        path = f"images/r{i}.png"
        img.save(os.path.join(d, path))
        color = list(COLORS)[i % 3]
        ans = str(counts[color])
        rows.append({"id": f"r{i}", "image": path, "question": f"How many {color} circles are in the image?",
                     "answer": ans, "solution": f"<think>\nI count the {color} circles: {ans}.\n</think>\n\n"
                                                f"The answer is \\boxed{{{ans}}}."})
    for name, part in (("sft", rows), ("rl", rows), ("val", rows[:2])):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in part))
    print(f"{d}: {n} samples, images 896x448")


if __name__ == "__main__":
    out = sys.argv[1]
    write_model(os.path.join(out, "model"))
    write_data(os.path.join(out, "data"))
