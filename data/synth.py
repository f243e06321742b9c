"""
Procedural visual-reasoning task: the embedded default data set (RECIPE.md section 8).

A scene is a 4x4 grid of 16 px cells on a 64x64 image; some cells hold a coloured shape
(red/green/blue/yellow x circle/square/triangle), drawn large and without anti-aliasing so a tiny
ViT trained from scratch can read them. Every question needs the image and a few reasoning steps;
every answer is verifiable (an integer, or a letter for multiple choice). Each sample carries a
short chain-of-thought trace; a fraction of traces make a slip and fix it with "Wait, ..." (so the
entropy of critical tokens, RECIPE.md section 5, has something to measure), and some add a
"Hmm," check or an "Alternatively," recount.

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
DOMAINS = ["count_color", "count_shape", "compare", "arithmetic", "position", "most_common"]
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

def grid_lines(scene):
    # a full transcription of the grid, cell by cell in reading order, each cell numbered by its column:
    # "Row 1: 1 red circle, 2 empty, 3 empty, 4 blue square." Reading the k-th cell means looking at the k-th image
    # token (one token per cell after pixel shuffle), an alignment a tiny model learns quickly; the reasoning lines
    # after it then work on text.
    return [f"Row {r}: " + ", ".join(
        f"{c} {o['color']} {o['shape']}" if (o := at(scene, r, c)) else f"{c} empty" for c in range(1, GRID + 1)) + "."
        for r in range(1, GRID + 1)]

def where(o):
    return f"row {o['row']} col {o['col']}"

def at(scene, row, col):
    return next((o for o in scene if o["row"] == row and o["col"] == col), None)

def count_line(label, objs, slip=False):
    # "Red shapes: row 1 col 2, row 3 col 4. That is 2." ; a slip misses the last one (or, with a single
    # one, miscounts it), then fixes it
    if not objs:
        return f"{label}: none. That is 0."
    if slip and len(objs) == 1:
        return f"{label}: {where(objs[0])}. That is 2. Wait, I listed only one position. That is 1."
    if slip:
        seen = ", ".join(where(o) for o in objs[:-1])
        return f"{label}: {seen}. That is {len(objs) - 1}. Wait, I missed {where(objs[-1])}. That is {len(objs)}."
    return f"{label}: {', '.join(where(o) for o in objs)}. That is {len(objs)}."

def count_lines(pairs, slip):
    # pairs: [(label, objs)]; the slip (if any) goes to the first list it can happen in
    lines, slipped = [], False
    for label, objs in pairs:
        s = slip and not slipped and len(objs) >= 1
        slipped |= s
        lines.append(count_line(label, objs, s))
    return lines

def colored(scene, c):
    return [o for o in scene if o["color"] == c]

def shaped(scene, s):
    return [o for o in scene if o["shape"] == s]

def mc(rng, correct):
    # four colour options in random order; returns (options, letter of the correct one)
    options = list(COLORS)
    rng.shuffle(options)
    return options, LETTERS[options.index(correct)]

# -----------------------------------------------------------------------------
# question families; each returns (question, answer, options, reasoning lines) or None if the
# scene does not suit the question (make_sample then draws a new scene)

def q_count_color(rng, scene, hard, slip):
    present = sorted({o["color"] for o in scene})
    if not hard:
        c = rng.choice(present) if rng.random() < 0.8 else rng.choice(list(COLORS))
        n = len(colored(scene, c))
        return f"How many {c} shapes are there?", n, None, count_lines([(f"{c.capitalize()} shapes", colored(scene, c))], slip)
    c1, c2 = rng.sample(list(COLORS), 2)
    a, b = len(colored(scene, c1)), len(colored(scene, c2))
    lines = count_lines([(f"{c1.capitalize()} shapes", colored(scene, c1)), (f"{c2.capitalize()} shapes", colored(scene, c2))], slip)
    return f"How many shapes are {c1} or {c2}?", a + b, None, lines + [f"Total: {a} + {b} = {a + b}."]

def q_count_shape(rng, scene, hard, slip):
    s = rng.choice(SHAPES)
    label = f"{s.capitalize()}s"
    if not hard:
        return f"How many {s}s are there?", len(shaped(scene, s)), None, count_lines([(label, shaped(scene, s))], slip)
    # hard: all shapes minus the named ones (two counts and a subtraction)
    n, k = len(scene), len(shaped(scene, s))
    lines = count_lines([("All shapes", scene), (label, shaped(scene, s))], slip) + [f"{n} - {k} = {n - k}."]
    if rng.random() < 0.3:  # a second route to the same number
        others = [o for o in scene if o["shape"] != s]
        lines.append("Alternatively, " + count_line(f"count the non-{s}s", others))
    return f"How many shapes are not {s}s?", n - k, None, lines

def q_compare(rng, scene, hard, slip):
    if not hard:
        c1, c2 = rng.sample(list(COLORS), 2)
        if len(colored(scene, c1)) < len(colored(scene, c2)):
            c1, c2 = c2, c1
        a, b = len(colored(scene, c1)), len(colored(scene, c2))
        lines = count_lines([(f"{c1.capitalize()} shapes", colored(scene, c1)), (f"{c2.capitalize()} shapes", colored(scene, c2))], slip)
        return f"How many more {c1} shapes than {c2} shapes are there?", a - b, None, lines + [f"{a} - {b} = {a - b}."]
    # hard: a shape count minus a colour count; the sets overlap and the result can be negative
    s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
    a, b = len(shaped(scene, s)), len(colored(scene, c))
    lines = count_lines([(f"{s.capitalize()}s", shaped(scene, s)), (f"{c.capitalize()} shapes", colored(scene, c))], slip)
    return f"What is the number of {s}s minus the number of {c} shapes?", a - b, None, lines + [f"{a} - {b} = {a - b}."]

def q_arithmetic(rng, scene, hard, slip):
    if not hard:
        c1, c2 = rng.sample(list(COLORS), 2)
        p1, p2 = rng.randint(2, 5), rng.randint(2, 5)
        a, b = len(colored(scene, c1)), len(colored(scene, c2))
        q = (f"Each {c1} shape is worth {p1} points and each {c2} shape is worth {p2} points. "
             f"Other shapes are worth nothing. What is the total?")
        lines = count_lines([(f"{c1.capitalize()} shapes", colored(scene, c1)), (f"{c2.capitalize()} shapes", colored(scene, c2))], slip)
        lines.append(f"{a} x {p1} = {a * p1}. {b} x {p2} = {b * p2}. Total: {a * p1} + {b * p2} = {a * p1 + b * p2}.")
        return q, a * p1 + b * p2, None, lines
    # hard: a value per shape type, three counts, three products, one sum
    pts = [rng.randint(2, 5) for _ in SHAPES]
    ks = [len(shaped(scene, s)) for s in SHAPES]
    q = f"A circle is worth {pts[0]} points, a square {pts[1]} and a triangle {pts[2]}. What is the total?"
    lines = count_lines([(f"{s.capitalize()}s", shaped(scene, s)) for s in SHAPES], slip)
    lines.append(" ".join(f"{k} x {p} = {k * p}." for k, p in zip(ks, pts)))
    total = sum(k * p for k, p in zip(ks, pts))
    lines.append(f"Total: {' + '.join(str(k * p) for k, p in zip(ks, pts))} = {total}.")
    return q, total, None, lines

def q_position(rng, scene, hard, slip):
    if not hard:
        o = rng.choice(scene)
        r, c = o["row"], o["col"]
        q = f"What colour is the shape in row {r}, column {c}?"
        lines = [f"Row {r}, column {c} has a {o['color']} {o['shape']}."]
        if slip:  # first read the neighbouring cell, then notice
            c2 = c + 1 if c < GRID else c - 1
            n = at(scene, r, c2)
            seen = f"a {n['color']} {n['shape']}" if n else "nothing"
            lines = [f"Row {r}, column {c2} has {seen}.", f"Wait, that is column {c2}, not column {c}."] + lines
    else:
        # the shape right of / below a reference shape that is unique by colour and shape
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
        lines = [f"The {ref['color']} {ref['shape']} is at {where(ref)}.",
                 f"Directly {word} it is {where(o)}, which has a {o['color']} {o['shape']}."]
        if slip:  # look the wrong way first
            wrong = at(scene, ref["row"] - (word == "below"), ref["col"] - (word != "below"))
            seen = f"a {wrong['color']} {wrong['shape']}" if wrong else "nothing"
            side = "above" if word == "below" else "to the left"
            lines[1:1] = [f"The cell {side} has {seen}.", f"Wait, the question asks {word}, not {side}."]
    options, letter = mc(rng, o["color"])
    return q, letter, options, lines + [f"{o['color'].capitalize()} is option {letter}."]

def q_most_common(rng, scene, hard, slip):
    pool, lines, q = scene, [], "Which colour appears most often?"
    if hard:
        s = rng.choice(SHAPES)
        pool = [o for o in scene if o["shape"] != s]
        q, lines = f"Ignoring the {s}s, which colour appears most often?", [f"Ignore the {s}s."]
    counts = {c: len(colored(pool, c)) for c in COLORS}
    best = max(counts.values())
    if list(counts.values()).count(best) > 1:
        return None  # the answer must be unique
    top = max(counts, key=counts.get)
    lines += count_lines([(f"{c.capitalize()}", colored(pool, c)) for c in COLORS], slip)
    options, letter = mc(rng, top)
    return q, letter, options, lines + [f"{top.capitalize()} has the most. {top.capitalize()} is option {letter}."]

BUILDERS = dict(count_color=q_count_color, count_shape=q_count_shape, compare=q_compare,
                arithmetic=q_arithmetic, position=q_position, most_common=q_most_common)

# -----------------------------------------------------------------------------

def make_sample(rng, domain, difficulty, p_wait=0.2, p_hmm=0.1, describe=True):
    """rng: random.Random. Returns dict(image, question, answer, options, solution, domain, difficulty, scene).
    describe: the trace opens by transcribing the grid (see grid_lines)."""
    assert domain in BUILDERS and difficulty in DIFFICULTIES, (domain, difficulty)
    for _ in range(1000):
        scene = make_scene(rng, difficulty)
        slip = rng.random() < p_wait
        out = BUILDERS[domain](rng, scene, difficulty == "hard", slip)
        if out is not None:
            break
    else:
        raise RuntimeError(f"no suitable scene for {domain}/{difficulty}")
    question, answer, options, lines = out
    if rng.random() < p_hmm:  # an explicit re-check before the final answer
        lines.insert(len(lines) - 1, "Hmm, let me check the grid row by row again. It matches.")
    lines = (grid_lines(scene) if describe else []) + lines
    solution = "<think>\n" + "\n".join(lines) + "\n</think>\n\n\\boxed{" + str(answer) + "}"
    return dict(image=render(scene), question=question, answer=str(answer), options=options, solution=solution,
                domain=domain, difficulty=difficulty, scene=scene)


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAINS:
        for diff in DIFFICULTIES:
            s = make_sample(rng, d, diff, p_wait=0.5)
            print(f"--- {d}/{diff}: {s['question']} {s['options'] or ''} -> {s['answer']}\n{s['solution']}")
