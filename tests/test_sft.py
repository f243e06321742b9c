"""sft.py end to end on a tiny model: loss goes down, resume reproduces the uninterrupted run exactly
(single process and 2 processes under torchrun with FSDP2, with and without DataLoader workers), 2 processes equal
1 process on the same global batch (the loss normalisation over ranks and micro-batches is right), and the images are
decoded per batch (peak RSS does not grow with the data set)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_install import check_env_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--vit_hidden=32", "--vit_layers=1",
        "--vit_heads=2", "--max_steps=6", "--save_every=3", "--eval_every=3", "--log_every=1", "--lr=3e-3"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    sys.path.insert(0, ROOT)
    from data.prepare import prepare
    out = tmp_path_factory.mktemp("synth")
    prepare(str(out), n_sft=48, n_rl=8, n_val=8, n_test=8)
    return str(out)


def run(args, out_dir, synth, nproc=1):
    base = [f"--out_dir={out_dir}", f"--data={synth}/sft.jsonl", f"--val_data={synth}/val.jsonl",
            f"--tokenizer={synth}/tokenizer"] + TINY
    if nproc == 1:
        cmd = [sys.executable, "sft.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "sft.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + base + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def losses(out_dir):
    by_step = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "loss" in d:
                by_step[d["step"]] = d["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return [by_step[s] for s in sorted(by_step)]


def interrupt_and_resume(out_dir, args, synth, nproc):
    # the checkpoint at step 3 is the same file whether or not the run went on: drop what came after it
    # (as if the run had died after step 3), then resume
    shutil.rmtree(os.path.join(out_dir, "ckpt_0000006"))
    shutil.rmtree(os.path.join(out_dir, "hf"))
    run(args + ["--init_from=resume"], out_dir, synth, nproc)


def test_sft_trains_and_resumes_exactly(synth, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run(["--batch_size=4"], a, synth)
    full = losses(a)
    assert len(full) == 6 and full[-1] < full[0], full  # it learns
    assert "val loss" in out
    assert os.path.isfile(os.path.join(a, "hf", "config.json")) and os.path.isfile(os.path.join(a, "hf", "tokenizer.json"))
    for d in (a, os.path.join(a, "hf"), os.path.join(a, "ckpt_0000006")):  # the run, its export, its checkpoints
        check_env_json(d, script="sft.py")
    shutil.copytree(a, b)
    # resumed with 2 DataLoader worker processes decoding the images (the first run: 0, in the training process)
    interrupt_and_resume(b, ["--batch_size=4", "--num_workers=2"], synth, 1)
    assert losses(b) == full  # bit-exact: same data order, optimizer state, schedule
    # grad accumulation: 2 micro-batches of 2 give the same step as one of 4 (token-mean over the global batch)
    c = str(tmp_path / "c")
    run(["--batch_size=2", "--grad_accum=2"], c, synth)
    assert losses(c) == pytest.approx(full, rel=1e-5)


def test_sft_fsdp_two_processes(synth, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(["--batch_size=4"], one, synth)
    run(["--batch_size=2"], two, synth, nproc=2)  # same global batch of 4, sharded over 2 ranks
    assert os.path.isfile(os.path.join(two, "hf", "config.json"))
    check_env_json(two, world_size=2, script="sft.py")
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    interrupt_and_resume(resumed, ["--batch_size=2", "--num_workers=1"], synth, 2)  # a worker per rank
    assert losses(resumed) == pytest.approx(losses(two), rel=1e-6)


def test_sft_images_load_lazily(synth, tmp_path):
    # 10,000 SFT samples with images: at start-up every sample is validated and measured (image sizes from the file
    # headers), but pixels are decoded per micro-batch, for this rank's samples only, so peak RSS is the same as with
    # 100 samples (eager decoding of every sample's tiles up front: +~500 MB here, ~200 GB per rank for R1V3's cold
    # start). Workers (num_workers=2) decode in their own processes and keep no more than their prefetch.
    with open(f"{synth}/sft.jsonl") as f:
        recs = [json.loads(line) for line in f]
    d = tmp_path / "big"
    (d / "img").mkdir(parents=True)
    for i in range(10):
        shutil.copy(os.path.join(synth, recs[i].get("image") or recs[i]["images"][0]), d / "img" / f"{i}.png")
    for n in (100, 10_000):
        with open(d / f"sft{n}.jsonl", "w") as f:
            for i in range(n):
                r = dict(recs[i % len(recs)], id=f"x{i}")
                r.pop("images", None)
                f.write(json.dumps(dict(r, image=f"img/{i % 10}.png")) + "\n")
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('sft.py', run_name='__main__'); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    rss, kids = {}, {}
    for n, workers in ((100, 0), (10_000, 0), (10_000, 2)):
        out = str(tmp_path / f"o{n}_{workers}")
        args = [f"--out_dir={out}", f"--data={d}/sft{n}.jsonl", "--val_data=", f"--tokenizer={synth}/tokenizer",
                "--batch_size=4", "--export=False", f"--num_workers={workers}"] + TINY + ["--max_steps=1"]
        p = subprocess.run([sys.executable, "-c", code, "sft.py"] + args, cwd=ROOT, capture_output=True, text=True,
                           timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert f"data: {n} train" in p.stdout
        self_kib, kids_kib = p.stdout.split("MAXRSS")[-1].split()
        rss[n, workers], kids[n, workers] = int(self_kib) / 1024, int(kids_kib) / 1024  # MiB (ru_maxrss: KiB)
    print("peak RSS MiB (samples, workers): main", rss, "largest worker", kids)
    # 10,000 samples' metadata is a few MB (the validation pass reads one line at a time); their tiles would be ~500
    assert rss[10_000, 0] - rss[100, 0] < 60, rss
    assert rss[10_000, 2] - rss[100, 0] < 60, rss
    assert kids[10_000, 2] - rss[100, 0] < 60, kids  # a worker: the parent's pages at fork + its prefetch


def test_rank_batches_resume_mid_epoch():
    # the data order sft.py trains on: global batches of each epoch's permutation (the remainder dropped), this rank's
    # share every world_size-th, its micro-batches every grad_accum-th; started at any (epoch, pos) it goes on as
    # the run that got there would
    from itertools import islice
    from data.common import RankBatches, epoch_order
    n, W, A, B = 23, 2, 3, 2  # 23 samples, 2 ranks, 3 micro-batches of 2: global batch 12, one step an epoch
    ranks = [RankBatches(n, W * A * B, r, W, A, seed=5) for r in range(W)]
    streams = [list(islice(iter(b), 3 * A)) for b in ranks]  # 3 steps
    for s in range(3):
        got = sorted(i for r in range(W) for mb in streams[r][s * A:(s + 1) * A] for i in mb)
        assert got == sorted(epoch_order(n, 5, s)[:12]), s  # each step: its epoch's first 12, split over the ranks
        assert all(len(mb) == B for r in range(W) for mb in streams[r][s * A:(s + 1) * A])
    epoch, pos = 0, 0
    for s in range(3):
        epoch, pos, idx = ranks[1].step(epoch, pos)
        assert ranks[1].micro(idx) == streams[1][s * A:(s + 1) * A] and (epoch, pos) == (s, 12)
        resumed = RankBatches(n, W * A * B, 1, W, A, seed=5, epoch=epoch, pos=pos)
        assert list(islice(iter(resumed), A)) == list(islice(iter(ranks[1]), (s + 2) * A))[-A:]
    with pytest.raises(ValueError, match="less than one global batch"):
        RankBatches(11, 12, 0, 1, 1, seed=5)


def test_sft_data_checked_up_front_decoded_per_sample(synth, tmp_path, capsys):
    # token lengths and tile counts from the image headers equal what decoding gives (multi-tile images, thumbnail);
    # a bad sample fails at load time with file:line (skip_bad: counted); DataLoader workers give the same batches
    from types import SimpleNamespace

    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from data.common import collate, load_sft_data
    tok = AutoTokenizer.from_pretrained(f"{synth}/tokenizer")
    cfg = SimpleNamespace(image_size=64, max_tiles=6, use_thumbnail=True, tokens_per_tile=16)
    for name, size in (("wide", (200, 60)), ("tall", (64, 190)), ("small", (40, 40)), ("big", (300, 250))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / f"{name}.png")
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    good = lambda i, imgs: dict(id=f"s{i}", images=imgs, question="How many?" + " <image>" * len(imgs),  # noqa: E731
                                answer="1", solution="<think>\nlook\n</think>\n\n\\boxed{1}", domain=f"d{i % 2}")
    recs = [good(0, ["wide.png"]), good(1, ["tall.png", "small.png"]), good(2, []), good(3, ["big.png", "wide.png"]),
            good(4, ["small.png"])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 1 else "") for i, r in enumerate(recs)))  # + a blank
    ds = load_sft_data(str(path), tok, cfg, max_len=2000)
    assert len(ds) == 5 and ds.domains == ["d0", "d1", "d0", "d1", "d0"]
    items = list(ds)  # decoded now
    assert [len(it["input_ids"]) for it in items] == ds.lengths.tolist()
    assert ds.tiles.tolist() == [0 if it["pixel_values"] is None else it["pixel_values"].shape[0] for it in items]
    assert ds.tiles[2] == 0 and min(ds.tiles[[0, 1, 3]]) > 2 and [it["id"] for it in items] == [f"s{i}" for i in range(5)]
    sub = ds.subset([3, 0, 3])
    assert [it["id"] for it in sub] == ["s3", "s0", "s3"] and sub.lengths.tolist() == ds.lengths[[3, 0, 3]].tolist()
    # the DataLoader path sft.py takes: 0 and 2 workers, the same batches
    batches = [[0, 1], [2, 3, 4], [1]]
    got = {}
    for w in (0, 2):
        kw = dict(prefetch_factor=2, multiprocessing_context="fork") if w else {}
        got[w] = list(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=w,
                                                  collate_fn=lambda b: collate(b, tok.pad_token_id), **kw))
    for a, b, idx in zip(got[0], got[2], batches):
        assert a["index"] == b["index"] == idx and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["n_tiles"] == b["n_tiles"]
    assert torch.equal(got[0][0]["input_ids"], collate(items[:2], tok.pad_token_id)["input_ids"])
    # bad samples: found at load time, named by file:line
    bad = recs[:2] + [dict(recs[2], images=["garbage.png"], question="How many? <image>"),
                      dict(recs[3], solution="word " * 3000)] + recs[4:]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(ValueError, match=f"{path}:3: cannot read image garbage.png"):
        load_sft_data(str(path), tok, cfg, max_len=2000)
    capsys.readouterr()
    ds = load_sft_data(str(path), tok, cfg, max_len=2000, skip_bad=True)
    assert [it["id"] for it in ds] == ["s0", "s1", "s4"]
    assert "skipped 2 samples" in capsys.readouterr().out
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:3]) + '{"id": "x", "question": \n')
    with pytest.raises(ValueError, match=f"{path}:4: malformed JSON"):
        load_sft_data(str(path), tok, cfg, max_len=2000)


def test_sft_bad_sample_stops_at_start_up(synth, tmp_path):
    # sft.py: a bad sample deep in the file stops the run before any step, naming file:line
    with open(f"{synth}/sft.jsonl") as f:
        lines = f.readlines()
    bad = tmp_path / "bad.jsonl"
    lines[40] = json.dumps(dict(json.loads(lines[40]), solution="word " * 1000)) + "\n"
    bad.write_text("".join(line.replace('"images/', f'"{synth}/images/') for line in lines))  # absolute image paths
    p = subprocess.run([sys.executable, "sft.py", f"--out_dir={tmp_path}/o", f"--data={bad}", "--val_data=",
                        f"--tokenizer={synth}/tokenizer", "--batch_size=4"] + TINY, cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0 and f"{bad}:41: sample" in p.stderr and "too long" in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(tmp_path, "o", "log.jsonl")) or "loss" not in open(
        os.path.join(tmp_path, "o", "log.jsonl")).read()
