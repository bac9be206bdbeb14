"""Duplicate detection against exact set computations, and the report script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from neox_jax.data import dedup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_text(rng, n_words=300):
    vocab = [f"w{i}" for i in range(5000)]
    return " ".join(rng.choice(vocab, n_words))


def exact_jaccard(a, b, n=5):
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def edit(rng, text, k):
    words = text.split()
    for i in rng.choice(len(words), k, replace=False):
        words[i] = "changed"
    return " ".join(words)


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    hasher = dedup.MinHasher(256)
    base = random_text(rng)
    for k in (1, 5, 20, 60):
        other = edit(rng, base, k)
        est = dedup.estimated_jaccard(hasher.signature(dedup.shingles(base)), hasher.signature(dedup.shingles(other)))
        assert abs(est - exact_jaccard(base, other)) < 0.1, (k, est, exact_jaccard(base, other))


def test_exact_and_near_duplicates_are_found():
    rng = np.random.default_rng(1)
    originals = [random_text(rng) for _ in range(30)]
    texts = list(originals)
    texts.append(originals[3].upper().replace(" ", "  \n"))  # exact after normalization
    texts.append(originals[7])  # exact
    texts.append(edit(rng, originals[10], 2))  # near: Jaccard ~0.94
    texts.append(edit(rng, originals[11], 80))  # not near: Jaccard well below 0.8
    assert exact_jaccard(texts[-2], originals[10]) > 0.9 and exact_jaccard(texts[-1], originals[11]) < 0.5
    flags = list(dedup.find_duplicates(texts))
    assert [i for i, (exact, _) in enumerate(flags) if exact] == [30, 31]
    assert [i for i, (_, near) in enumerate(flags) if near] == [30, 31, 32]


def test_report_per_component_and_script(tmp_path):
    rng = np.random.default_rng(2)
    a, b = random_text(rng), random_text(rng)
    lines = [{"text": a, "meta": {"pile_set_name": "Github"}},
             {"text": b, "meta": {"pile_set_name": "Pile-CC"}},
             {"text": a, "meta": {"pile_set_name": "Pile-CC"}},
             {"text": edit(rng, b, 1), "meta": {"pile_set_name": "Pile-CC"}}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = dedup.dedup_report(str(path))
    assert report["components"]["Github"]["docs"] == 1 and report["components"]["Github"]["near_duplicates"] == 0
    cc = report["components"]["Pile-CC"]
    assert (cc["docs"], cc["exact_duplicates"], cc["near_duplicates"]) == (3, 1, 2)
    assert cc["near_rate"] == pytest.approx(2 / 3)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "dedup_report.py"), str(path),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, check=True)
    assert "Pile-CC" in out.stdout and "TOTAL" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["total"]["exact_duplicates"] == 1
