"""
The chance level of the embedded task: a "blind" answerer that never looks at the image and always gives the most
frequent answer of the question's family and difficulty (counted on the rl split) -- the score a model must beat to
show it uses the image and the reasoning at all.

    python dev/blind_baseline.py [data/synth]     # prints its accuracy on the test split, per family
"""
import collections
import json
import os
import sys

d = sys.argv[1] if len(sys.argv) > 1 else "data/synth"
read = lambda split: [json.loads(line) for line in open(os.path.join(d, f"{split}.jsonl"))]
majority = collections.defaultdict(collections.Counter)
for s in read("rl"):
    majority[s["domain"], s["difficulty"]][s["answer"]] += 1
hits = collections.defaultdict(list)
for s in read("test"):
    guess = majority[s["domain"], s["difficulty"]].most_common(1)[0][0]
    hits[s["domain"], s["difficulty"]].append(guess == s["answer"])
for (dom, diff), h in sorted(hits.items()):
    print(f"{dom:12s} {diff:7s} {100 * sum(h) / len(h):5.1f}% of {len(h)}")
allh = [x for h in hits.values() for x in h]
print(f"blind baseline on {d}/test.jsonl: {100 * sum(allh) / len(allh):.1f}% of {len(allh)}")
