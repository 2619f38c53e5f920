"""How far Hugging Face's rotated-key cache drifts from exact dynamic NTK, step by step.

    python benchmarks/decode_drift.py --workdir=runs/quick/models/rope --factor=8 --length=512

Teacher-forces a held-out text through cached decoding twice: with lcr's exact dynamic-NTK cache
(keys cached unrotated and re-rotated with the current base each step, equal to the full forward)
and with ``decode.rotated_key_cache=true`` (each key keeps the base of the step that made it, as
in transformers' generate before issue 25104 was addressed). Prints, per range of positions, the
mean KL(exact ‖ rotated) of the next-token distributions, the largest logit difference, how
often the greedy tokens agree, and each one's negative log-likelihood of the text; then one JSON
line per range. Without ``--workdir`` the model is a random one of the quickstart's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string('workdir', None, 'a trained RoPE model (default: random weights)')
_FACTOR = flags.DEFINE_float('factor', 8.0, 'dynamic NTK factor s')
_LENGTH = flags.DEFINE_integer('length', 512, 'tokens of text decoded')
_PROMPT = flags.DEFINE_integer('prompt', 16, 'tokens prefilled before the steps')
_BINS = flags.DEFINE_integer('bins', 4, 'ranges of positions reported')


def load():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lcr.config import ModelConfig
  from lcr.model import TransformerLM
  if _WORKDIR.value:
    from lcr import checkpoint
    from lcr.data import pipeline
    params, saved = checkpoint.load_params(_WORKDIR.value)
    split = pipeline.load_eval_tokens(saved.data, 'validation')
    return params, saved.model, np.asarray(split.tokens[:_LENGTH.value], np.int32), saved.train.seq_len
  cfg = ModelConfig(vocab_size=259, num_layers=2, d_model=128, num_heads=4, pos='rope')
  params = TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  text = np.random.default_rng(0).integers(3, 259, size=_LENGTH.value).astype(np.int32)
  return params, cfg, text, 64


def main(argv):
  del argv
  import numpy as np
  from lcr.config import DecodeConfig
  from lcr.decode import engine
  params, cfg, text, train_len = load()
  cfg = dataclasses.replace(cfg, rope_scaling='dynamic_ntk', rope_factor=_FACTOR.value,
                            rope_original_length=train_len, attention_backend='xla')
  tokens, prompt = text[None], np.asarray([_PROMPT.value])
  logits = {}
  for name, rotated in (('exact', False), ('rotated', True)):
    decode = DecodeConfig(rotated_key_cache=rotated)
    logits[name] = engine.cached_logits(params, cfg, decode, tokens, prompt)[0, :-1]
  log_p = {k: v - np.logaddexp.reduce(v, axis=-1, keepdims=True) for k, v in logits.items()}
  targets = text[_PROMPT.value:]
  positions = np.arange(_PROMPT.value - 1, _PROMPT.value - 1 + len(targets))
  kl = np.sum(np.exp(log_p['exact']) * (log_p['exact'] - log_p['rotated']), axis=-1)
  nll = {k: -v[np.arange(len(targets)), targets] for k, v in log_p.items()}
  agree = np.argmax(logits['exact'], -1) == np.argmax(logits['rotated'], -1)
  diff = np.max(np.abs(logits['exact'] - logits['rotated']), axis=-1)
  rows = []
  for part in np.array_split(np.arange(len(targets)), _BINS.value):
    lo, hi = int(positions[part[0]]), int(positions[part[-1]])
    rows.append(dict(positions=f'{lo}-{hi}', past_training_length=bool(lo >= train_len),
                     mean_kl=float(kl[part].mean()), max_logit_diff=float(diff[part].max()),
                     greedy_agreement=float(agree[part].mean()),
                     nll_exact=float(nll['exact'][part].mean()),
                     nll_rotated=float(nll['rotated'][part].mean())))
  print(f'dynamic NTK s={_FACTOR.value:g}, L={train_len}, '
        f'{"trained " + _WORKDIR.value if _WORKDIR.value else "random weights"}')
  print('| positions | mean KL(exact‖rotated) | max |Δlogit| | greedy agreement | NLL exact | NLL rotated |')
  print('|---|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['positions']} | {r['mean_kl']:.4f} | {r['max_logit_diff']:.3f} | "
          f"{r['greedy_agreement']:.1%} | {r['nll_exact']:.3f} | {r['nll_rotated']:.3f} |")
  for r in rows:
    print(json.dumps(r))


if __name__ == '__main__':
  app.run(main)
