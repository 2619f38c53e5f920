"""Contiguous training streams (data.contiguous) and the recurrent state the trainer carries.

  * The batches against a restatement: row b of step n is stream tokens [b·P + n·L, … + L + 1) of
    an L-token-aligned part P = ⌊(N − 1)/B⌋, positions count along the part, segment ids name
    documents globally (≥ 2, new each epoch), and the rows of two processes are the one-process
    batch split in two; the grain iterator restores exactly.
  * The train step starts each batch from the state the last one ended in (Transformer-XL's
    memory): its loss is the model's loss on the batch with that memory, and a run interrupted
    and resumed from a checkpoint (which holds the memory) ends with the same metrics.
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import cli, losses, metrics, step, train
from lcr.data import contiguous, pipeline
from lcr.mixers import carry

from test_data import mock_cfg  # noqa: F401  (the fixture: a tiny tfds corpus, bytes)
from test_train import array_data


@dataclasses.dataclass
class Stream:
  """What ContiguousBatches reads from a TokenStream."""
  tokens: np.ndarray
  doc_offsets: np.ndarray

  @property
  def num_tokens(self):
    return len(self.tokens)

  @property
  def num_documents(self):
    return len(self.doc_offsets) - 1


def test_rows_continue_their_part_of_the_stream():
  tokens = np.arange(100, 203, dtype=np.int32)                  # 103 tokens, 4 documents
  offsets = np.array([0, 30, 31, 70, 103])
  rows, length = 3, 5
  source = contiguous.ContiguousBatches(Stream(tokens, offsets), length, rows, range(rows))
  part = (103 - 1) // rows                                       # 34 tokens per row
  assert (source.part, source.steps_per_epoch) == (part, part // length)
  doc_of = np.searchsorted(offsets, np.arange(103), side='right') - 1
  for n in (0, 1, 6, 7, 13):                                     # epoch 0, and 1 from n = 6
    epoch, k = divmod(n, 6)
    batch = source[n]
    for b in range(rows):
      start = b * part + k * length
      idx = np.arange(start, start + length)
      np.testing.assert_array_equal(batch['inputs'][b], tokens[idx])
      np.testing.assert_array_equal(batch['targets'][b], tokens[idx + 1])
      np.testing.assert_array_equal(batch['positions'][b], n * length + np.arange(length))
      np.testing.assert_array_equal(batch['segment_ids'][b], 2 + doc_of[idx] + 4 * epoch)
      np.testing.assert_array_equal(batch['weights'][b], doc_of[idx] == doc_of[idx + 1])
  # Consecutive steps: each row's inputs start where its targets ended.
  np.testing.assert_array_equal(source[1]['inputs'][:, 0], source[0]['targets'][:, -1])


def test_pipeline_rows_per_process_and_restore(mock_cfg):  # noqa: F811
  cfg = dataclasses.replace(mock_cfg, contiguous=True, shuffle=False)
  kwargs = dict(seq_len=4, batch_size=4, seed=0)
  whole = pipeline.make_train_iterator(cfg, **kwargs)
  halves = [pipeline.make_train_iterator(cfg, process_index=p, process_count=2, **kwargs)
            for p in (0, 1)]
  for _ in range(3):
    batch, parts = next(whole), [next(h) for h in halves]
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
  saved = whole.get_state()
  after = next(whole)
  again = pipeline.make_train_iterator(cfg, **kwargs)
  again.set_state(saved)
  np.testing.assert_array_equal(next(again)['inputs'], after['inputs'])
  np.testing.assert_array_equal(after['positions'][:, 0], 3 * 4)


def xl_config(**train_fields):
  fields = dict(steps=4, batch_size=8, seq_len=8, warmup_steps=1, log_every=1, eval_every=0,
                eval_batches=1, checkpoint_every=2, keep_checkpoints=2, **train_fields)
  return cli.load('configs/lm.py:smoke', [f'train.{k}={v}' for k, v in fields.items()] + [
      'model.vocab_size=32', 'model.memory=xl', 'model.segment_length=8',
      'model.memory_length=8', 'model.num_layers=1', 'data.contiguous=True',
      'data.shuffle=False', 'train.tensorboard=False'])


def test_train_step_continues_from_the_last_steps_memory():
  cfg = xl_config()
  trainer = step.make_trainer(cfg)
  data = array_data(cfg).train
  batches = [next(data) for _ in range(2)]
  state = trainer.init_state()
  model = carry.stateful(cfg.model)

  def loss(params, memory, batch):
    logits, updated = model.apply({'params': params, 'cache': memory}, batch['inputs'],
                                  batch['positions'], batch['segment_ids'], mutable=['cache'])
    total, count = losses.cross_entropy(logits, batch['targets'], batch['weights'])
    return float(total / count), jax.device_get(updated['cache'])

  params0 = jax.device_get(state.params)
  _, memory1 = loss(params0, jax.device_get(state.memory), batches[0])
  state, _ = trainer.train_step(state, batches[0])
  assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6),
                                   jax.device_get(state.memory), jax.tree.map(np.asarray, memory1)))
  params1 = jax.device_get(state.params)
  want, _ = loss(params1, memory1, batches[1])
  fresh, _ = loss(params1, carry.empty(carry.abstract_memory(model, 8, 8)), batches[1])
  _, m = trainer.train_step(state, batches[1])
  assert float(m['loss']) == pytest.approx(want, rel=1e-5)
  assert abs(want - fresh) > 1e-4          # the memory changed the loss


def test_a_resumed_run_carries_the_saved_memory(tmp_path):
  """Resuming from the step-2 checkpoint of a 4-step run gives its steps 3 and 4 again."""
  cfg = xl_config()
  whole = train.train(cfg, str(tmp_path / 'whole'), array_data(cfg))
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'whole', resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '4')
  (resumed_dir / 'metrics.jsonl').write_text('')
  resumed = train.train(cfg, str(resumed_dir), array_data(cfg))
  assert resumed['loss'] == pytest.approx(whole['loss'], rel=1e-6)
  later = [r['loss'] for r in metrics.read_metrics(str(tmp_path / 'whole')) if r['step'] > 2]
  assert [r['loss'] for r in metrics.read_metrics(str(resumed_dir))] == pytest.approx(later, rel=1e-6)


def test_sharded_steps_with_memory_equal_single_device_steps():
  """An invariant is the reference: two steps over a (2, 2, 2) mesh, the carried state sharded
  by its logical axes (batch over data and fsdp), give the single-device steps' losses, state
  and parameters."""
  from lcr import sharding
  from test_sharding import random_batch, tiny_config

  def config(shape):
    cfg = tiny_config(shape, num_kv_heads=0, num_layers=1, memory='infini', segment_length=8)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, contiguous=True,
                                                             shuffle=False))
  sharded = step.make_trainer(config((2, 2, 2)))
  single_cfg = config((1, 1, 1))
  single = step.make_trainer(single_cfg, mesh=sharding.make_mesh(single_cfg.mesh,
                                                                 devices=jax.devices()[:1]))
  leaf = jax.tree.leaves(sharded.state_sharding.memory)[0]
  assert tuple(leaf.spec)[0] == ('data', 'fsdp')
  s8, s1 = sharded.init_state(), single.init_state()
  for seed in (0, 1):
    batch = random_batch(config((1, 1, 1)), seed)
    s8, m8 = sharded.train_step(s8, sharding.global_batch(batch, sharded.batch_sharding))
    s1, m1 = single.train_step(s1, sharding.global_batch(batch, single.batch_sharding))
    np.testing.assert_allclose(float(m8['loss']), float(m1['loss']), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get((s8.params, s8.memory))),
                  jax.tree.leaves(jax.device_get((s1.params, s1.memory)))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lora_on_a_carried_state_trains_only_the_adapters():
  """The stateful model the trainer carries is built with the LoRA updates (lcr.peft): two steps
  on a contiguous stream change exactly the SSM's adapters and carry its state."""
  from lcr import sharding
  from lcr.config import PeftConfig
  from test_sharding import random_batch, tiny_config

  cfg = tiny_config((1, 1, 1), num_kv_heads=0, num_layers=1, mixer='ssm', pos='none')
  cfg = dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, contiguous=True, shuffle=False),
      peft=PeftConfig(method='lora', rank=2, targets=r'mixer/(in_proj|out_proj)/kernel'))
  trainer = step.make_trainer(cfg, mesh=sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
  state = trainer.init_state()
  before = jax.device_get(state.params)
  for seed in (0, 1):
    state, _ = trainer.train_step(state, sharding.global_batch(random_batch(cfg, seed),
                                                               trainer.batch_sharding))
  changed = sorted(jax.tree_util.keystr(path) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(jax.device_get(state.params)))
      if not np.array_equal(a, b))
  assert changed == [f"['layer_0']['mixer']['{p}']['lora_{ab}']"
                     for p in ('in_proj', 'out_proj') for ab in 'ab']
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(jax.device_get(state.memory)))
