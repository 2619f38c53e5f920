"""Text in, text out: ``run.py --mode=generate`` on a trained workdir.

The model, tokenizer and config come from the workdir (``config.json`` and the latest checkpoint);
``--config.a.b=v`` overrides still apply, e.g. ``--config.decode.top_p=0.9`` or an evaluation-time
RoPE scaling ``--config.model.rope_scaling=yarn`` (its original length defaults to the training
length, its factor to (prompt + new tokens) / training length, as in evaluation). The prompt is
``[bos] + encode(text)``, as training documents start; generation stops at EOS, after
``decode.max_new_tokens`` or after a ``decode.stop`` string (which is not printed).

Greedy and sampled text is streamed token by token; incomplete UTF-8 at the end, and any end that
could be the start of a stop string, is held back until it is decided.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import ml_collections
import numpy as np
from absl import logging

from lcr.config import Config, ConfigError, from_config_dict
from lcr.decode import beam, engine

REPLACEMENT = '\ufffd'


class StreamPrinter:
  """Prints the text of a growing token list as it becomes final; detects stop strings."""

  def __init__(self, tokenizer: Any, stops: Sequence[str], out: TextIO | None):
    self.tokenizer, self.stops, self.out = tokenizer, tuple(stops), out
    self.ids: list[int] = []
    self.printed = 0
    self.stopped = False

  def text(self) -> str:
    """The continuation so far, cut before the first stop string."""
    text = self.tokenizer.decode(np.asarray(self.ids, np.int64))
    cuts = [text.find(s) for s in self.stops if s in text]
    return text[:min(cuts)] if cuts else text

  def add(self, token: int) -> bool:
    """Appends a token, prints what is final; True once a stop string has appeared."""
    self.ids.append(int(token))
    full = self.tokenizer.decode(np.asarray(self.ids, np.int64))
    self.stopped = any(s in full for s in self.stops)
    text = self.text()
    final = len(text) if self.stopped else self._settled(text)
    self._print(text[self.printed:final])
    return self.stopped

  def finish(self) -> str:
    text = self.text()
    self._print(text[self.printed:])
    return text

  def _settled(self, text: str) -> int:
    end = len(text.rstrip(REPLACEMENT))
    for stop in self.stops:   # an ending that may grow into a stop string waits
      for k in range(min(len(stop) - 1, end), 0, -1):
        if text[end - k:end] == stop[:k]:
          end -= k
          break
    return max(end, self.printed)

  def _print(self, piece: str) -> None:
    if piece and self.out is not None:
      self.out.write(piece)
      self.out.flush()
    self.printed += len(piece)


def generation_config(workdir: str, overrides: Sequence[str], prompt_len: int) -> Config:
  """The workdir's config with ``overrides`` applied (and RoPE scaling defaults filled in)."""
  from lcr import checkpoint, cli
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(
        f'{workdir} has no trained model ({checkpoint.CONFIG_FILE} and {checkpoint.CHECKPOINT_DIR}/ '
        'are written by training); train first or pass the right --workdir')
  with open(path) as f:
    cd = ml_collections.ConfigDict(_tuples(json.load(f)))
  for override in overrides:
    cli.apply_override(cd, override)
  model, train_len = cd.model, cd.train.seq_len
  if model.rope_scaling != 'none' and not model.rope_original_length:
    model.rope_original_length = train_len
    if model.rope_factor == 1.0 and model.rope_scaling != 'dynamic_ntk':
      model.rope_factor = max(1.0, (prompt_len + cd.decode.max_new_tokens) / train_len)
    logging.info('rope_scaling=%s from the training length %d, factor %.3g', model.rope_scaling,
                 train_len, model.rope_factor)
  return from_config_dict(cd)


def _tuples(value: Any) -> Any:
  """JSON lists back into the tuples config fields hold (so overrides parse as they do for files)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def generate_text(workdir: str, overrides: Sequence[str], prompt: str,
                  out: TextIO | None = sys.stdout) -> list[str]:
  """Generates from ``prompt`` with the workdir's model; streams to ``out``; returns the text(s).

  Beam search returns its ``num_beams`` hypotheses, best first (the best is printed).
  """
  from lcr import checkpoint
  from lcr.data.tokenizers import get_tokenizer
  if not prompt:
    raise ConfigError('--prompt is empty: give the text to continue (--prompt=TEXT or '
                      '--prompt_file=FILE)')
  saved = checkpoint.read_config(workdir)
  if saved is None:
    generation_config(workdir, overrides, 0)    # raises the missing-model error
  tokenizer = get_tokenizer(saved.data)
  ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32)
  config = generation_config(workdir, overrides, len(ids))
  keep = {f: getattr(saved.model, f) for f in EVAL_TIME_FIELDS}
  checkpoint.check_compatible(
      saved, dataclasses.replace(config, model=dataclasses.replace(config.model, **keep)), workdir)
  params, _ = checkpoint.load_params(workdir)
  decode = config.decode
  if decode.strategy == 'beam':
    beams = beam.beam_search(params, config.model, decode, [ids], eos_id=tokenizer.eos_id)
    texts = []
    for i in range(decode.num_beams):
      printer = StreamPrinter(tokenizer, decode.stop, None)
      for token in beams.tokens[0, i, :beams.lengths[0, i]]:
        printer.add(token)
      texts.append(printer.finish())
      logging.info('beam %d: score %.4f (log-prob %.4f): %r', i, beams.scores[0, i],
                   beams.log_probs[0, i], texts[-1])
    if out is not None:
      out.write(texts[0])
      out.flush()
    return texts
  printer = StreamPrinter(tokenizer, decode.stop, out)

  def on_step(tokens, index, emitted):
    del index
    return np.asarray([printer.add(tokens[0]) if emitted[0] else False])

  engine.generate(params, config.model, decode, [ids], eos_id=tokenizer.eos_id, on_step=on_step)
  return [printer.finish()]


# Model fields generation may change without retraining: RoPE scalings, the attention backend, and
# the attention pattern (e.g. StreamingLLM's sinks on a model trained with full causal attention).
EVAL_TIME_FIELDS = ('rope_scaling', 'rope_factor', 'rope_original_length', 'yarn_beta_fast',
                    'yarn_beta_slow', 'attention_backend', 'attention', 'window', 'sink_tokens',
                    'global_tokens', 'attention_block')

