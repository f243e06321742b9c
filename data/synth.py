"""
Procedural visual-reasoning task: the embedded default data set (docs/recipe.md, "The embedded default").

A scene is a 4x4 grid of 16 px cells on a 64x64 image; some cells hold a coloured shape
(red/green/blue/yellow x circle/square/triangle), drawn large and without anti-aliasing so a tiny
ViT trained from scratch can read them. Every question needs the image and a few reasoning steps;
every answer is verifiable (an integer, or a letter for multiple choice). Each sample carries a
short chain-of-thought trace; a fraction of traces make a slip and fix it with "Wait, ..." (so the
entropy of critical tokens, docs/recipe.md "Critical-token entropy", has something to measure), and some add a
"Hmm," check or an "Alternatively," second route. The traces are scratchpads built for a tiny model (see
"pieces of the chain-of-thought traces" below): a one-token-per-cell grid code, then a key, the cells' values and
a running tally, or a look-up.

    import random
    from data.synth import make_sample, DOMAINS
    s = make_sample(random.Random(0), "count_color", "normal")
    s["image"], s["question"], s["answer"], s["solution"], s["scene"]

Rows and columns are 1-indexed, row 1 at the top, column 1 on the left.
"""
import random

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 4
CELL = IMAGE_SIZE // GRID  # 16 px
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}
SHAPES = ["circle", "square", "triangle"]
BACKGROUND, GRIDLINE = (245, 245, 245), (190, 190, 190)
DOMAINS = ["count_color", "count_shape", "count_both", "compare", "arithmetic", "position"]
DIFFICULTIES = ["normal", "hard"]
N_OBJECTS = {"normal": (3, 6), "hard": (6, 10)}  # inclusive range of shapes per scene
LETTERS = "ABCD"

# -----------------------------------------------------------------------------
# scene and rendering

def make_scene(rng, difficulty):
    n = rng.randint(*N_OBJECTS[difficulty])
    cells = sorted(rng.sample(range(GRID * GRID), n))  # row-major order
    return [dict(row=i // GRID + 1, col=i % GRID + 1, color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES))
            for i in cells]

def render(scene):
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for k in range(1, GRID):  # interior grid lines help the model find rows and columns
        d.line([(k * CELL, 0), (k * CELL, IMAGE_SIZE - 1)], fill=GRIDLINE)
        d.line([(0, k * CELL), (IMAGE_SIZE - 1, k * CELL)], fill=GRIDLINE)
    for o in scene:
        x0, y0 = (o["col"] - 1) * CELL + 2, (o["row"] - 1) * CELL + 2
        x1, y1 = x0 + CELL - 5, y0 + CELL - 5  # 12x12 box inside the cell
        fill = COLORS[o["color"]]
        if o["shape"] == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif o["shape"] == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        else:  # triangle, apex up
            d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img

# -----------------------------------------------------------------------------
# pieces of the chain-of-thought traces
#
# The traces are scratchpads for a ~1M-parameter model. The question comes before the image in the prompt, so the
# trace starts at the same distance from the image in every sample; after pixel shuffle each of the 16 image tokens
# is one grid cell, in reading order.
# 1. "Grid:" then one code per cell in reading order, one token each ("rc" = red circle, "--" = empty): the k-th
#    code sits at a fixed distance from the k-th image token, a lookup that attention with RoPE learns fast (the
#    tiny SFT model reads the grid exactly in 99%+ of test images after 500 steps; dev/LOG.md).
# 2. Counting questions, three lines that each take one short look-up per token:
#    "Key:" what each of the 12 kinds of shape is worth under the question's condition ("rc=1 rs=0 ..."), always
#    in the same order, so entry k depends on the question alone; "Values:" each cell's worth, its code looked up
#    in the key ("rc=1" is one token, so that is one attention hop; empty cells 0); "Tally:" the running total,
#    the k-th number at a fixed distance from the k-th value. Then the total. Position questions: the code of the
#    asked cell, then the answer.
# What did not work (dev/LOG.md): a readable "Row 1: 1 red circle, 2 empty, ..." transcription (cells at varying
# distances from their image tokens: the grid was not read after 500 steps); a tally that applies the question's
# condition to each cell directly (the tiny model did not learn it: ~45% of tally entries right); a key written as
# two tokens per entry ("rc 1": the look-up then needs an induction head, ~84% of values right).

def code(o):
    return "--" if o is None else o["color"][0] + o["shape"][0]

def at(scene, row, col):
    return next((o for o in scene if o["row"] == row and o["col"] == col), None)

def cells(scene):
    return [at(scene, r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)]

def grid_line(scene):
    return "Grid: " + " ".join(code(o) for o in cells(scene))  # no full stop: " --." would be one pre-token

ALL_CODES = [c[0] + s[0] for c in COLORS for s in SHAPES]  # the 12 object codes, in the key's fixed order
KEY_VALUES = range(-1, 4)  # every value a key entry can take; "rc=1" etc. are one token each (data/prepare.py)

def tally(scene, value, slip=False, blind=None):
    """value(o) -> int for an object. -> (lines, total): the key, the cells' values, the running total, the total;
    a slip states the total one off, then corrects it from the tally ("Wait, ..."). blind: a colour the teacher
    overlooks (its kinds are worth 0 in the key, so the trace and its total are wrong; see make_sample)."""
    key = {c[0] + s[0]: int(value(dict(color=c, shape=s))) * (c != blind) for c in COLORS for s in SHAPES}
    vals, run, k = [], [], 0
    for o in cells(scene):
        v = key[code(o)] if o else 0
        k += v
        vals.append(str(v))
        run.append(str(k))
    lines = ["Key: " + " ".join(f"{c}={key[c]}" for c in ALL_CODES), f"Values: {' '.join(vals)}",
             f"Tally: {' '.join(run)}"]
    if slip:
        return lines + [f"That is {k - 1 if k else 1}. Wait, the tally ends at {k}. That is {k}."], k
    return lines + [f"That is {k}."], k

def mc(rng, correct):
    # four colour options in random order; returns (options, letter of the correct one)
    options = list(COLORS)
    rng.shuffle(options)
    return options, LETTERS[options.index(correct)]

# -----------------------------------------------------------------------------
# question families; each returns (question, answer, options, reasoning lines) or None if the
# scene does not suit the question (make_sample then draws a new scene)

def q_count_color(rng, scene, hard, slip, blind=None):
    if not hard:
        present = sorted({o["color"] for o in scene})
        c = rng.choice(present) if rng.random() < 0.8 else rng.choice(list(COLORS))
        lines, n = tally(scene, lambda o: o["color"] == c, slip, blind)
        return f"How many {c} shapes are there?", n, None, lines
    c1, c2 = rng.sample(list(COLORS), 2)
    lines, n = tally(scene, lambda o: o["color"] in (c1, c2), slip, blind)
    return f"How many shapes are {c1} or {c2}?", n, None, lines

def q_count_shape(rng, scene, hard, slip, blind=None):
    s = rng.choice(SHAPES)
    if not hard:
        lines, n = tally(scene, lambda o: o["shape"] == s, slip, blind)
        return f"How many {s}s are there?", n, None, lines
    lines, n = tally(scene, lambda o: o["shape"] != s, slip, blind)
    if rng.random() < 0.3:  # a second route to the same number
        seen = [o for o in scene if o["color"] != blind]
        k = sum(o["shape"] == s for o in seen)
        lines.append(f"Alternatively, {len(seen)} shapes minus {k} {s}s is {n}.")
    return f"How many shapes are not {s}s?", n, None, lines

def q_compare(rng, scene, hard, slip, blind=None):
    if not hard:  # a difference of two colour counts, never negative at the end (it can be on the way)
        c1, c2 = rng.sample(list(COLORS), 2)
        if sum(o["color"] == c1 for o in scene) < sum(o["color"] == c2 for o in scene):
            c1, c2 = c2, c1
        lines, n = tally(scene, lambda o: (o["color"] == c1) - (o["color"] == c2), slip, blind)
        return f"How many more {c1} shapes than {c2} shapes are there?", n, None, lines
    # hard: a shape count minus a colour count; the sets overlap and the result can be negative
    s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
    lines, n = tally(scene, lambda o: (o["shape"] == s) - (o["color"] == c), slip, blind)
    return f"What is the number of {s}s minus the number of {c} shapes?", n, None, lines

def q_arithmetic(rng, scene, hard, slip, blind=None):
    if not hard:
        c1, c2 = rng.sample(list(COLORS), 2)
        p = {c1: rng.randint(2, 3), c2: rng.randint(2, 3)}
        q = (f"Each {c1} shape is worth {p[c1]} points and each {c2} shape is worth {p[c2]} points. "
             f"Other shapes are worth nothing. What is the total?")
        lines, n = tally(scene, lambda o: p.get(o["color"], 0), slip, blind)
        return q, n, None, lines
    p = {s: rng.randint(1, 3) for s in SHAPES}
    q = f"A circle is worth {p['circle']} points, a square {p['square']} and a triangle {p['triangle']}. What is the total?"
    lines, n = tally(scene, lambda o: p[o["shape"]], slip, blind)
    return q, n, None, lines

def q_count_both(rng, scene, hard, slip, blind=None):
    c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if not hard:
        if rng.random() < 0.8:  # mostly a kind that is there, or the answer would nearly always be 0
            o = rng.choice(scene)
            c, s = o["color"], o["shape"]
        lines, n = tally(scene, lambda o: o["color"] == c and o["shape"] == s, slip, blind)
        return f"How many {c} {s}s are there?", n, None, lines
    lines, n = tally(scene, lambda o: o["color"] == c or o["shape"] == s, slip, blind)
    return f"How many shapes are {c} or {s}s?", n, None, lines

def q_position(rng, scene, hard, slip, blind=None):
    if not hard:
        o = rng.choice(scene)
        r, c = o["row"], o["col"]
        q = f"What colour is the shape in row {r}, column {c}?"
        lines = [f"Row {r}, column {c}: {code(o)}"]
        if slip:  # first read the neighbouring column, then notice
            c2 = c + 1 if c < GRID else c - 1
            lines[:0] = [f"Row {r}, column {c2}: {code(at(scene, r, c2))}", f"Wait, that is column {c2}, not column {c}."]
    else:
        # the shape right of / below a reference shape that is unique by colour and shape: in the grid code, the
        # next code, or the code four cells on
        pairs = []
        for o in scene:
            if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in scene) > 1:
                continue
            for dr, dc, word in [(0, 1, "to the right of"), (1, 0, "below")]:
                t = at(scene, o["row"] + dr, o["col"] + dc)
                if t:
                    pairs.append((o, t, word))
        if not pairs:
            return None
        ref, o, word = rng.choice(pairs)
        q = f"What colour is the shape directly {word} the {ref['color']} {ref['shape']}?"
        step = "One cell" if word == "to the right of" else "Four cells"
        lines = [f"{step} after {code(ref)}: {code(o)}"]
        back_r, back_c = ref["row"] - (word == "below"), ref["col"] - (word != "below")
        if slip and back_r >= 1 and back_c >= 1:  # look the wrong way first
            side = "above" if word == "below" else "to the left"
            lines[:0] = [f"{step} before {code(ref)}: {code(at(scene, back_r, back_c))}",
                         f"Wait, the question asks {word}, not {side}."]
    options, letter = mc(rng, o["color"])
    return q, letter, options, lines + [f"That is a {o['color']} {o['shape']}. {o['color'].capitalize()} is option {letter}."]

BUILDERS = dict(count_color=q_count_color, count_shape=q_count_shape, compare=q_compare,
                arithmetic=q_arithmetic, count_both=q_count_both, position=q_position)

# -----------------------------------------------------------------------------

def make_sample(rng, domain, difficulty, p_wait=0.2, p_hmm=0.1, blind=None):
    """rng: random.Random. Returns dict(image, question, answer, options, solution, domain, difficulty, scene).
    The question ends with an "<image>" placeholder: the image comes after the question in the prompt.
    blind: a colour (e.g. "yellow") the trace's author overlooks in counting questions: a systematically wrong
    teacher, as distilled cold-start data can be. The answer is then the trace's (wrong) conclusion; the scene, the
    question and the rng draws are the same as without it."""
    assert domain in BUILDERS and difficulty in DIFFICULTIES, (domain, difficulty)
    for _ in range(1000):
        scene = make_scene(rng, difficulty)
        slip = rng.random() < p_wait
        out = BUILDERS[domain](rng, scene, difficulty == "hard", slip, blind)
        if out is not None:
            break
    else:
        raise RuntimeError(f"no suitable scene for {domain}/{difficulty}")
    question, answer, options, lines = out
    if rng.random() < p_hmm:  # an explicit re-check at the end (the tally must stay right below the grid)
        lines.append("Hmm, let me check the grid again. It matches.")
    lines = [grid_line(scene)] + lines
    solution = "<think>\n" + "\n".join(lines) + "\n</think>\n\n\\boxed{" + str(answer) + "}"
    return dict(image=render(scene), question=question + "\n<image>", answer=str(answer), options=options, solution=solution,
                domain=domain, difficulty=difficulty, scene=scene)


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAINS:
        for diff in DIFFICULTIES:
            s = make_sample(rng, d, diff, p_wait=0.5)
            print(f"--- {d}/{diff}: {s['question']} {s['options'] or ''} -> {s['answer']}\n{s['solution']}")
