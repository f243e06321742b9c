"""
The last stage of dev/rehearsal.sh: the export of a real-shape model, loaded by transformers as a user would.

    python dev/rehearsal_reload.py EXPORT_DIR DATA.jsonl

Checks: AutoTokenizer loads it; InternVLForConditionalGeneration.from_pretrained loads it and its logits on the
first item's prompt (image tiles included) equal ours (fp32, max |diff| printed, must be < 1e-3); AutoProcessor
loads it where torchvision is installed (transformers' InternVL image processor needs it) and turns the item's
image into the same pixel values as our tiling.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from transformers import AutoTokenizer, InternVLForConditionalGeneration  # noqa: E402

from data.common import encode_prompt, load_jsonl  # noqa: E402
from plumbing.hf import load_pretrained  # noqa: E402

path, data = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path)
ours = load_pretrained(path).eval()
item = load_jsonl(data)[0]
ids, pix = encode_prompt(tok, item, ours.cfg)
x = torch.tensor([ids])
with torch.no_grad():
    a = ours(x, pixel_values=pix) if pix is not None else ours(x)
    a = a if torch.is_tensor(a) else a[0]
    del ours
    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    b = hf(input_ids=x, pixel_values=pix, attention_mask=torch.ones_like(x)).logits
diff = (a.float() - b.float()).abs().max().item()
print(f"logits {tuple(b.shape)}: max |ours - transformers| = {diff:.2e} over {len(ids)} tokens, "
      f"{0 if pix is None else pix.shape[0]} tiles")
assert diff < 1e-3, diff
if importlib.util.find_spec("torchvision") is None:
    print("AutoProcessor: not checked (torchvision is not installed)")
else:
    from PIL import Image
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(path)
    img = Image.open(item["images"][0]).convert("RGB")
    out = proc.image_processor(images=[img], return_tensors="pt")
    pd = (out["pixel_values"].float() - pix.float()).abs().max().item()
    print(f"AutoProcessor: {type(proc).__name__}, pixel values {tuple(out['pixel_values'].shape)}, max |diff| {pd:.2e}")
    assert out["pixel_values"].shape == pix.shape and pd < 1e-2, pd
print("reload: ok")
