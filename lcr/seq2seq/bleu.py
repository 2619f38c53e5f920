"""BLEU from sacrebleu (Post 2018), at corpus and sentence level, on symbol sequences.

A sequence of task symbols is scored as the text of its symbols joined by spaces, so BLEU counts
symbol n-grams. Corpus BLEU uses sacrebleu's defaults (13a tokenisation, exponential smoothing,
4-grams); sentence BLEU, the RL reward, adds ``effective_order`` (sacrebleu's recommendation for
single sentences: no penalty for n-gram orders a short sentence cannot have). Scores are 0–100.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU

_CORPUS = BLEU()
_SENTENCE = BLEU(effective_order=True)


def _text(symbols: Sequence[str]) -> str:
  return ' '.join(symbols)


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
  return float(_CORPUS.corpus_score([_text(h) for h in hypotheses],
                                    [[_text(r) for r in references]]).score)


def sentence_bleu(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
  return float(_SENTENCE.sentence_score(_text(hypothesis), [_text(reference)]).score)


def signatures() -> dict[str, str]:
  """sacrebleu's signature strings of the corpus and the sentence metric (one reference each)."""
  out = {}
  for name, metric in (('corpus', BLEU()), ('sentence', BLEU(effective_order=True))):
    metric.corpus_score(['a'], [['a']])   # the signature records the number of references seen
    out[name] = str(metric.get_signature())
  return out
