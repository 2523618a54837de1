"""Build the demo model's word n-gram language model (``@demo-lm``, an ARPA file) from sentences of
its training sentence generator, never from the held-out ones.

    python -m tools.make_demo_lm [--sentences 40000] [--order 3] [--min-count 5]

KenLM's ``lmplz``, the usual estimator, is neither on PyPI nor in Debian; the Python packages that
read ARPA files do not estimate them. So this writes interpolated Kneser-Ney (Ney's discount per
order) in ARPA's backoff form, as ``lmplz`` writes it, with n-grams above unigrams seen fewer than
``--min-count`` times pruned before estimation (counted as unseen, unlike ``lmplz --prune``, which
prunes after). The demo's sentences are random word
sequences, so what the model knows is its 500 words and where sentences start and end; that is what
lets a beam search correct a misspelt word.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from pipeline import bundled
from tools.demo_model import sample_sentence

SEED = 7_700_001  # apart from training's and the held-out set's seeds
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def sentences(n: int, seed: int, exclude: Iterable[str]) -> list[str]:
    """``n`` sentences of the training generator, none of them in ``exclude``."""
    rng, excluded, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        text = sample_sentence(rng)
        if text not in excluded:
            out.append(text)
    return out


def kneser_ney_arpa(texts: Iterable[str], order: int, min_count: int) -> str:
    """Interpolated Kneser-Ney estimates of ``texts`` as an ARPA file's text."""
    counts: list[Counter] = [Counter() for _ in range(order + 1)]  # counts[n][ngram tuple]
    for text in texts:
        words = [BOS, *text.split(), EOS]
        for n in range(1, order + 1):
            for i in range(len(words) - n + 1):
                counts[n][tuple(words[i:i + n])] += 1
    # Lower orders count distinct left extensions (continuation counts), except n-grams that
    # start a sentence, which nothing extends.
    adjusted: list[Counter] = [Counter() for _ in range(order + 1)]
    adjusted[order] = Counter(counts[order])
    for n in range(order - 1, 0, -1):
        for gram in counts[n + 1]:
            adjusted[n][gram[1:]] += 1
        for gram, c in counts[n].items():
            if gram[0] == BOS:
                adjusted[n][gram] = c
    adjusted[1].pop((BOS,), None)
    for n in range(2, order + 1):  # prune rare n-grams above unigrams
        adjusted[n] = Counter({g: c for g, c in adjusted[n].items() if counts[n][g] >= min_count})

    vocab = sorted({w for (w,) in counts[1] if w != BOS} | {UNK})  # what can follow: never <s>
    prob: list[dict] = [{} for _ in range(order + 1)]
    backoff: list[dict] = [{} for _ in range(order + 1)]
    for n in range(1, order + 1):
        of_count = Counter(adjusted[n].values())
        n1, n2 = of_count.get(1, 0), of_count.get(2, 0)
        discount = min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 + n2 else 0.5
        by_context: dict[tuple, dict[str, int]] = defaultdict(dict)
        for gram, c in adjusted[n].items():
            by_context[gram[:-1]][gram[-1]] = c
        for context, following in by_context.items():
            total = sum(following.values())
            kept = {w: max(c - discount, 0.0) / total for w, c in following.items()}
            gamma = 1.0 - sum(kept.values())  # the mass of what was discounted or pruned
            if n == 1:  # interpolated with the uniform distribution over the vocabulary
                prob[1] = {(w,): kept.get(w, 0.0) + gamma / len(vocab) for w in vocab}
                continue
            backoff[n - 1][context] = gamma
            for w, p in kept.items():
                prob[n][(*context, w)] = p + gamma * _interpolated(prob, backoff, (*context[1:], w))
    prob[1][(BOS,)] = 0.0  # never predicted; there for its backoff
    lines = ["\\data\\", *(f"ngram {n}={len(prob[n])}" for n in range(1, order + 1)), ""]
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        for gram in sorted(prob[n]):
            p = prob[n][gram]
            logp = -99.0 if p <= 0 else math.log10(p)
            entry = f"{logp:.6f}\t{' '.join(gram)}"
            if n < order:
                entry += f"\t{math.log10(backoff[n][gram]) if backoff[n].get(gram, 0) > 0 else 0.0:.6f}"
            lines.append(entry)
        lines.append("")
    lines.append("\\end\\")
    return "\n".join(lines) + "\n"


def _interpolated(prob: list[dict], backoff: list[dict], gram: tuple) -> float:
    """p(w | context) of the lower orders already estimated, backing off where unseen."""
    n = len(gram)
    if gram in prob[n]:
        return prob[n][gram]
    if n == 1:
        return prob[1].get((UNK,), 0.0)
    return backoff[n - 1].get(gram[:-1], 1.0) * _interpolated(prob, backoff, gram[1:])


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=40_000)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(bundled.lm_path("@demo-lm")))
    args = ap.parse_args(argv)
    heldout = [r["reference"] for r in _heldout_rows()]
    text = kneser_ney_arpa(sentences(args.sentences, SEED, heldout), args.order, args.min_count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text):,} bytes)")
    return args.out


def _heldout_rows() -> list[dict]:
    from pipeline.config import InputConfig
    from pipeline.manifest import read_manifest

    return read_manifest(InputConfig(path="@heldout")).select(["reference"]).to_pylist()


if __name__ == "__main__":
    main()
