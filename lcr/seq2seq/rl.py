"""Fine-tuning on BLEU by REINFORCE with a self-critical baseline (Rennie et al. 2017).

The decoder is the policy. Each step samples w^s for every source (temperature
``seq2seq.rl.temperature``) and decodes ŵ greedily, both with lcr.decode's cached loops; the reward
is sentence BLEU against the target (sacrebleu, lcr.seq2seq.bleu, scaled to [0, 1]), and the loss

    L = −(1/B) Σ_b (r(w^s_b) − r(ŵ_b)) Σ_t log p(w^s_bt | w^s_b,<t, x_b)

raises the probability of samples that beat the greedy decode and lowers it for the others
(eq. 7). With ``rl.mixer`` (MIXER, Ranzato et al. 2016 §3.3) the first max(|y| − Δ, 0) output
tokens are the gold ones, trained by cross-entropy, and the model samples (and the baseline
decodes) only the rest; Δ starts at ``mixer_delta`` and grows by it every ``mixer_every`` steps.
The run starts from the teacher-forced checkpoint in ``rl.init`` and resumes like training.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcr import sharding
from lcr.config import Config
from lcr.seq2seq import bleu, data, tasks, tips
from lcr.seq2seq import config as config_lib
from lcr.seq2seq import train as train_lib
from lcr.seq2seq.evaluate import Generator
from lcr.step import TrainState


class RLExamples:
  """Training sources and targets, right-padded to the training length's longest."""

  def __init__(self, config: Config, process_index: int, process_count: int):
    self.task_cfg = config.seq2seq.task
    task = tasks.REGISTRY[self.task_cfg.name]
    self.sizes = (task.max_source(self.task_cfg.train_len), task.max_target(self.task_cfg.train_len))
    self.process_index, self.process_count = process_index, process_count

  def __len__(self) -> int:
    return 2 ** 31 - 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    source, target = tasks.train_example(self.task_cfg, index * self.process_count + self.process_index)
    out = {}
    for name, symbols, size in (('source', source, self.sizes[0]), ('target', target, self.sizes[1])):
      out[name] = np.zeros(size, np.int32)
      out[name][:len(symbols)] = tasks.encode(symbols)
      out[f'{name}_length'] = np.int32(len(symbols))
    return out


def mixer_delta(rl, step: int) -> int:
  """Δ at ``step``: output tokens (from the end) trained by REINFORCE; the rest by cross-entropy."""
  return rl.mixer_delta * (1 + step // rl.mixer_every)


def prefix_lengths(rl, target_lengths: np.ndarray, step: int) -> np.ndarray:
  """Gold tokens each row keeps (0 without MIXER); outputs count their EOS."""
  if not rl.mixer:
    return np.zeros_like(target_lengths)
  return np.maximum(target_lengths + 1 - mixer_delta(rl, step), 0)


def _rows(local) -> tuple[list[np.ndarray], list[np.ndarray]]:
  sources = [local['source'][b, :local['source_length'][b]] for b in range(len(local['source']))]
  targets = [local['target'][b, :local['target_length'][b]] for b in range(len(local['target']))]
  return sources, targets


class Step:
  """One RL step: decode on the host's loop, rewards with sacrebleu, a jitted gradient step."""

  def __init__(self, setup: train_lib.Setup, config: Config):
    self.setup, self.config, self.rl = setup, config, config.seq2seq.rl
    task = config.seq2seq.task
    lengths = tasks.REGISTRY[task.name]
    self.max_new = lengths.max_target(task.train_len) + 1   # EOS included
    sampling = dataclasses.replace(config, decode=dataclasses.replace(
        config.decode, temperature=self.rl.temperature, top_k=0, top_p=1.0))
    self.generator = Generator(setup.arch, sampling, source_len=lengths.max_source(task.train_len),
                               max_new=self.max_new, prefix_len=self.max_new - 1)
    self.row = setup.arch.row_lengths()

    def update(state: TrainState, batch, num_sequences):
      def loss(params):
        return tips.reinforce_loss(setup.arch.forward(params, batch), num_sequences)
      value, grads = jax.value_and_grad(loss)(state.params)
      updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
      return (TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state),
              value, optax.tree.norm(grads))
    self.update = jax.jit(setup.under_rules(update), donate_argnums=0)

  def __call__(self, state: TrainState, local) -> tuple[TrainState, dict[str, float]]:
    step = int(state.step)
    sources, targets = _rows(local)
    keep = prefix_lengths(self.rl, np.asarray(local['target_length']), step)
    outputs = [np.concatenate([t, [tasks.EOS_ID]]) for t in targets]
    prefixes = [o[:k] for o, k in zip(outputs, keep)]
    params = state.params
    sampled = self.generator(params, sources, 'sample', prefixes=prefixes,
                             seed=self.config.seed * 1_000_003 + step)
    greedy = self.generator(params, sources, 'greedy', prefixes=prefixes)
    reward = lambda p, gen, t: bleu.sentence_bleu(tasks.decode(np.concatenate([p, gen])),
                                                  tasks.decode(t)) / 100.0
    r_sample = np.asarray([reward(p, g, t) for p, g, t in zip(prefixes, sampled, targets)])
    r_greedy = np.asarray([reward(p, g, t) for p, g, t in zip(prefixes, greedy, targets)])
    advantage = r_sample - r_greedy
    rows = []
    for src, p, gen, adv in zip(sources, prefixes, sampled, advantage):
      out = np.concatenate([p, gen])[:self.max_new]
      weights = np.where(np.arange(len(out)) < len(p), 1.0, adv)
      rows.append(data.pad_example(self.setup.arch.features(src, out, weights), self.row))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    state, loss, grad_norm = self.update(
        state, sharding.global_batch(batch, self.setup.batch_sharding), jnp.float32(len(rows)))
    return state, {'loss': loss, 'grad_norm': grad_norm, 'reward_sample': r_sample.mean(),
                   'reward_greedy': r_greedy.mean(), 'lr': self.setup.schedule(step),
                   'gold_tokens': float(keep.mean())}


def finetune(config: Config, workdir: str) -> dict[str, float]:
  """RL fine-tuning of the teacher-forced model in ``seq2seq.rl.init``, in ``workdir``."""
  config_lib.check_run(config)
  rl = config.seq2seq.rl
  if not rl.steps:
    config_lib.fail('seq2seq.rl.steps', rl.steps, 'RL fine-tuning needs > 0 steps')
  params = train_lib.restore_params(rl.init, config)
  train_cfg = dataclasses.replace(config.train, steps=rl.steps, lr=rl.lr, batch_size=rl.batch_size,
                                  warmup_steps=0, min_lr_ratio=1.0)
  setup = train_lib.make_setup(config, train_cfg)

  def init():
    placed = jax.device_put(params, setup.state_sharding.params)
    return TrainState(jnp.zeros((), jnp.int32), placed, setup.tx.init(placed))
  process_count = jax.process_count()
  if rl.batch_size % process_count:
    config_lib.fail('seq2seq.rl.batch_size', rl.batch_size, f'must split over {process_count} processes')
  source = grain.MapDataset.source(RLExamples(config, jax.process_index(), process_count))
  iterator = iter(source.to_iter_dataset().batch(rl.batch_size // process_count, drop_remainder=True))
  step = Step(setup, config)
  return train_lib.run_loop(setup, workdir, train_cfg, step, iterator, rl.batch_size, init=init)
