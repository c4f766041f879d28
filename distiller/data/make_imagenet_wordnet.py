"""Regenerate ``imagenet_wordnet.json``: which ImageNet-1k classes lie under each WordNet noun synset.

    apt-get install wordnet-base          # WordNet 3.0, the version ImageNet's wnids use
    python distiller/data/make_imagenet_wordnet.py [/usr/share/wordnet] [timm's imagenet_synsets.txt]

Output: ``classes`` (the 1000 wnids in timm's order, with their names), ``synsets`` (every synset
with at least one ImageNet class underneath: its lemmas and the class indices under it) and
``lemmas`` (every noun lemma with a sense among those synsets: all its noun senses, in WordNet's
sense order, so "first sense" means what WordNet means by it).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent / "imagenet_wordnet.json"


def parse_data_noun(path: Path):
    lemmas, parents = {}, defaultdict(list)
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        head = line.split("|")[0].split()
        off = head[0]
        w_cnt = int(head[3], 16)
        words = [head[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
        i = 4 + 2 * w_cnt
        p_cnt = int(head[i])
        for k in range(p_cnt):
            sym, target, pos = head[i + 1 + 4 * k: i + 4 + 4 * k]
            if sym in ("@", "@i") and pos == "n":
                parents[off].append(target)
        lemmas[off] = words
    return lemmas, parents


def parse_index_noun(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        lemma, p_cnt = f[0].replace("_", " "), int(f[3])
        sense_cnt = int(f[4 + p_cnt])
        out[lemma] = f[-sense_cnt:]
    return out


def build(wordnet: Path, synsets_txt: Path, names_txt: Path | None = None) -> dict:
    lemmas, parents = parse_data_noun(wordnet / "data.noun")
    index = parse_index_noun(wordnet / "index.noun")
    wnids = [w.strip() for w in synsets_txt.read_text().splitlines() if w.strip()]
    names = {}
    if names_txt and names_txt.exists():
        for line in names_txt.read_text().splitlines():
            wnid, _, name = line.partition("\t")
            names[wnid] = name.strip()
    under = defaultdict(set)
    for ci, wnid in enumerate(wnids):
        stack, seen = [wnid[1:]], set()
        while stack:
            off = stack.pop()
            if off in seen:
                continue
            seen.add(off)
            under[off].add(ci)
            stack.extend(parents.get(off, []))
    synsets = {off: {"lemmas": lemmas[off], "classes": sorted(cls)} for off, cls in sorted(under.items())}
    lem = {w: senses for w, senses in sorted(index.items()) if any(s in synsets for s in senses)}
    return {"source": "WordNet 3.0 (Debian wordnet-base) hypernym closure of timm's imagenet_synsets.txt",
            "classes": [{"wnid": w, "name": names.get(w, lemmas[w[1:]][0])} for w in wnids],
            "synsets": synsets, "lemmas": lem}


if __name__ == "__main__":
    wn = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/usr/share/wordnet")
    if len(sys.argv) > 2:
        syn = Path(sys.argv[2])
    else:
        import timm.data
        syn = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    data = build(wn, syn, syn.parent / "imagenet_synset_to_lemma.txt")
    OUT.write_text(json.dumps(data, separators=(",", ":"), sort_keys=False) + "\n")
    print(f"{OUT}: {len(data['classes'])} classes, {len(data['synsets'])} synsets, {len(data['lemmas'])} lemmas")
