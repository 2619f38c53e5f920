"""LoRA and adapters (lcr.peft) against their formulas; the frozen base; train.init_from."""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import checkpoint, init_from, peft, step, train
from lcr.config import Config, ConfigError, ModelConfig, PeftConfig, TrainConfig
from lcr.data.config import DataConfig
from lcr.model import TransformerLM

D, H, FFN, V = 32, 4, 48, 29
CFG = ModelConfig(vocab_size=V, num_layers=2, d_model=D, num_heads=H, ffn_dim=FFN, pos='rope',
                  attention_backend='xla')
TARGETS = 'attention/(query|value|out)/kernel|ffn/wi/kernel'
LORA = PeftConfig(method='lora', rank=3, alpha=6.0, targets=TARGETS)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(2, 12)))


FAST_COMPILE = {'xla_backend_optimization_level': 0}   # these tests compile more than they run


def init(model, tokens=TOKENS, seed=0):
  params = jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.key(seed), tokens)
  return jax.device_get(nn.meta.unbox(params['params']))


def apply(model, params, tokens=TOKENS):
  return np.asarray(jax.jit(model.apply, compiler_options=FAST_COMPILE)({'params': params}, tokens))


def base_part(params):
  """The parameters a TransformerLM has (PEFT leaves dropped)."""
  if not isinstance(params, dict):
    return params
  return {k: base_part(v) for k, v in params.items()
          if k not in (peft.LORA_A, peft.LORA_B, peft.ADAPTER)}


def with_random_lora_b(params, seed=1):
  rng = np.random.default_rng(seed)
  def fill(path, x):
    return rng.normal(size=x.shape).astype(x.dtype) if peft.path_name(path).endswith('lora_b') else x
  return jax.tree_util.tree_map_with_path(fill, params)


@pytest.mark.parametrize('peft_cfg, atol', [
    (LORA, 0.0), (PeftConfig(method='adapter', adapter_dim=5), 1e-6)])
def test_the_initial_model_is_the_base(peft_cfg, atol):
  """B = 0 adds exactly zero; an adapter's identity is exact too (see the next tests), but the
  compiled graphs differ, so XLA may round the unchanged sums differently (1e-6)."""
  params = init(peft.model_for(CFG, peft_cfg))
  assert any(peft.is_peft_param(n) for n in peft._paths(params))
  np.testing.assert_allclose(apply(peft.model_for(CFG, peft_cfg), params),
                             apply(TransformerLM(CFG), base_part(params)), rtol=0, atol=atol)


def numpy_merge(kernel, a, b, alpha, rank):
  """Hu et al. 2021 eq. 3 on the flattened matrices: W + (α/r)·A·B, A [d_in, r], B [r, d_out]."""
  d_out = math.prod(b.shape[1:])
  d_in = kernel.size // d_out
  merged = kernel.reshape(d_in, d_out) + alpha / rank * a.reshape(d_in, rank) @ b.reshape(rank, d_out)
  return merged.reshape(kernel.shape)


@pytest.mark.parametrize('scan', [False, True])
def test_merged_equals_unmerged_and_the_formula(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = with_random_lora_b(init(peft.model_for(cfg, LORA)))
  merged = peft.merge(LORA, params)
  unmerged_logits = apply(peft.model_for(cfg, LORA), params)
  np.testing.assert_allclose(apply(TransformerLM(cfg), merged), unmerged_logits, atol=1e-5,
                             rtol=1e-6)
  assert not np.allclose(unmerged_logits, apply(TransformerLM(cfg), base_part(params)), atol=1e-3)
  layers = params['layers'] if scan else params['layer_0']
  got = merged['layers'] if scan else merged['layer_0']
  for sub, name in (('attention', 'query'), ('attention', 'out'), ('ffn', 'wi')):
    p = layers[sub][name]
    pick = (lambda x: x[1]) if scan else (lambda x: x)          # layer 1 of the stack
    want = numpy_merge(*(np.asarray(pick(p[k]), np.float64) for k in ('kernel', 'lora_a', 'lora_b')),
                       LORA.alpha, LORA.rank)
    np.testing.assert_allclose(pick(got[sub][name]['kernel']), want, rtol=1e-5, atol=1e-6)
  assert 'lora_a' not in json.dumps(jax.tree.map(lambda x: 0, merged))


def test_trainable_count_is_rank_times_in_plus_out_over_the_targets():
  params = init(peft.model_for(CFG, LORA))
  per_layer = 3 * ((D + D) + (D + D) + (D + D) + (D + FFN))      # q, v, out: 32→32; wi: 32→48
  trainable, total = peft.count(LORA, params)
  assert trainable == 2 * per_layer
  base = sum(x.size for x in jax.tree.leaves(base_part(params)))
  assert total == base + trainable
  extra = dataclasses.replace(LORA, trainable_extra='token_embedding|norm')
  norms = 2 * 2 * (2 * D) + 2 * D                 # 2 norms per layer (scale, bias) + final norm
  assert peft.count(extra, params)[0] == 2 * per_layer + V * D + norms


def test_adapter_is_the_bottleneck_formula():
  adapter = peft.Adapter(dim=5)
  h = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, D)), jnp.float32)
  params = jax.device_get(adapter.init(jax.random.key(0), h)['params'])
  np.testing.assert_array_equal(adapter.apply({'params': params}, h), h)      # identity at init
  assert 0 < np.abs(params['down']['kernel']).max() <= 2e-2                 # N(0, 1e-2), 2σ cut
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  x = np.asarray(h, np.float64)
  z = x @ params['down']['kernel'] + params['down']['bias']
  gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  want = x + gelu @ params['up']['kernel'] + params['up']['bias']
  np.testing.assert_allclose(adapter.apply({'params': params}, h), want, rtol=1e-4, atol=1e-4)
  names = peft._paths(init(peft.model_for(CFG, PeftConfig(method='adapter', adapter_dim=5))))
  assert {n.rsplit('/adapter', 1)[0] for n in names if '/adapter/' in n} == {
      f'layer_{i}/{s}' for i in (0, 1) for s in ('attention', 'ffn')}


# ----------------------------------------------------------------------------------------------
# Training: frozen base, optimizer state, checkpoint.


class _Iter:
  """A checkpointable stand-in for the data iterator (the trainer's state is what is tested)."""

  def get_state(self):
    return {'next_index': 0}

  def set_state(self, state):
    pass


def lora_config(**peft_kwargs) -> Config:
  return Config(model=CFG, peft=dataclasses.replace(LORA, **peft_kwargs),
                train=TrainConfig(steps=2, batch_size=8, seq_len=12, lr=1e-2, warmup_steps=0))


@pytest.fixture(scope='module')
def trained_lora():
  config = lora_config(trainable_extra='final_norm')
  trainer = step.make_trainer(config)
  state = trainer.init_state()
  before = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, V, size=(8, 12))
  batch = dict(inputs=inputs, targets=np.roll(inputs, -1, 1), positions=np.tile(np.arange(12), (8, 1)),
               segment_ids=np.ones((8, 12), np.int32), weights=np.ones((8, 12), np.float32))
  batch = train.sharding.global_batch(batch, trainer.batch_sharding)
  grad_norms = []
  for _ in range(2):
    state, metrics = trainer.train_step(state, batch)
    grad_norms.append(float(metrics['grad_norm']))
  return config, trainer, before, state, batch, grad_norms


def test_base_is_bit_identical_after_training_and_holds_no_optimizer_state(trained_lora):
  config, trainer, before, state, _, _ = trained_lora
  after = jax.device_get(state.params)
  mask = jax.tree.leaves(peft.trainable_mask(config.peft, before))
  for trains, b, a, (path, _) in zip(mask, jax.tree.leaves(before), jax.tree.leaves(after),
                                     jax.tree_util.tree_leaves_with_path(before)):
    name = peft.path_name(path)
    if trains:
      assert not np.array_equal(a, b), f'{name} should have trained'
    else:
      assert a.tobytes() == b.tobytes(), f'{name} changed'
  assert any(m for m in mask) and not all(mask)
  # Adam's moments exist for the trainable parameters only: 2 × trainable values, plus counters.
  trainable, _ = peft.count(config.peft, before)
  state_values = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert state_values == 2 * trainable


def test_reported_gradient_norm_is_over_the_trainable_parameters(trained_lora):
  """The backward pass stops at the frozen parameters: |g| covers the trainable ones only."""
  config, trainer, before, _, batch, grad_norms = trained_lora
  batch = jax.device_get(batch)

  def loss(params):
    logits, _ = step.forward(trainer.model, params, batch)
    total, weights = step.losses.cross_entropy(logits, batch['targets'], batch['weights'])
    return total / weights
  grads = jax.device_get(jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(before))
  mask = jax.tree.leaves(peft.trainable_mask(config.peft, before))
  squares = [np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)]
  want = math.sqrt(sum(sq for sq, t in zip(squares, mask) if t))
  assert math.sqrt(sum(squares)) > 1.5 * want          # the frozen gradients would show
  np.testing.assert_allclose(grad_norms[0], want, rtol=1e-4)


def test_checkpoint_restores_the_peft_state(trained_lora, tmp_path):
  _, trainer, _, state, _, _ = trained_lora
  ckpt = checkpoint.Checkpointer(str(tmp_path), 1)
  ckpt.save(2, state, _Iter())
  ckpt.wait()
  restored = ckpt.restore(2, trainer.abstract_state(), _Iter())
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_peft_config_is_one_error_naming_the_field():
  params = init(TransformerLM(CFG))
  with pytest.raises(ConfigError, match=r'peft.targets=.*matches no parameter.*'
                                        r'layer_0/attention/query/kernel.*layer_1/ffn/wo/kernel'):
    peft.check(PeftConfig(method='lora', targets='attn/q_proj'), params)
  with pytest.raises(ConfigError, match='peft.trainable_extra=.*matches no parameter'):
    peft.check(PeftConfig(method='lora', trainable_extra='layernorm'), params)
  for field, kwargs in (('peft.rank', dict(method='lora', rank=0)),
                        ('peft.rank', dict(rank=-2)),
                        ('peft.trainable_extra', dict(trainable_extra='norm')),
                        ('peft.targets', dict(method='lora', targets='(')),
                        ('peft.method', dict(method='prefix')),
                        ('peft.adapter_dim', dict(method='adapter', adapter_dim=0))):
    with pytest.raises(ConfigError, match=field):
      PeftConfig(**kwargs)


# ----------------------------------------------------------------------------------------------
# train.init_from.


def save_run(workdir, config, params, step_=3):
  """A finished run in ``workdir``: config.json and a checkpoint of ``params`` at ``step_``."""
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_config(workdir, config)
  state = step.TrainState(step=jnp.asarray(step_), params=jax.device_put(params), opt_state={})
  ckpt = checkpoint.Checkpointer(workdir, 1)
  ckpt.save(step_, state, _Iter())
  ckpt.close()


MQAR = DataConfig(task='mqar', mqar_pairs=2, mqar_vocab=8)
SMALL = dataclasses.replace(CFG, vocab_size=25, num_layers=1)


def task_config(**train_kwargs) -> Config:
  return Config(model=SMALL, data=MQAR, train=TrainConfig(
      steps=1, batch_size=8, seq_len=12, warmup_steps=1, checkpoint_every=0, eval_batches=1,
      tensorboard=False, **train_kwargs))


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('source'))
  params = with_random_lora_b(init(TransformerLM(SMALL)), seed=5)   # no LoRA: just params
  params = jax.tree.map(lambda x: x + 0.25, params)                 # not the initialisation
  save_run(workdir, task_config(), params)
  return workdir, params


def test_init_from_loads_the_parameters_bit_exactly(source_run, tmp_path):
  workdir, params = source_run
  # One step at learning rate 0 (the warmup's first step): the run ends where it started.
  train.train_and_evaluate(task_config(init_from=workdir), str(tmp_path / 'new'))
  loaded, saved = checkpoint.load_params(str(tmp_path / 'new'))
  assert saved.train.init_from == workdir
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  for path in (os.path.join(workdir, 'checkpoints'), os.path.join(workdir, 'checkpoints', '3')):
    assert init_from.resolve(path) == (workdir, None if path.endswith('checkpoints') else 3)


def test_init_from_adds_fresh_lora_to_loaded_base_and_merges_a_lora_source(source_run):
  workdir, params = source_run
  fresh = init(peft.model_for(SMALL, LORA), seed=9)
  got = init_from.transfer(params, fresh, origin=workdir)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(fresh)):
    name = peft.path_name(path)
    if peft.is_peft_param(name):
      np.testing.assert_array_equal(x, y)                 # LoRA as initialised (B = 0)
  np.testing.assert_array_equal(base_part(got)['layer_0']['attention']['query']['kernel'],
                                params['layer_0']['attention']['query']['kernel'])
  lora_params = with_random_lora_b(fresh, seed=2)
  merged = init_from.transfer(peft.merge(LORA, lora_params), init(TransformerLM(SMALL)))
  np.testing.assert_array_equal(merged['layer_0']['attention']['query']['kernel'],
                                peft.merge(LORA, lora_params)['layer_0']['attention']['query']['kernel'])


def test_init_from_errors_name_the_field_and_learned_tables_extend_on_request(source_run, tmp_path):
  workdir, params = source_run
  with pytest.raises(ConfigError, match=r'train.init_from=.*does not exist'):
    init_from.resolve(str(tmp_path / 'nowhere'))
  with pytest.raises(ConfigError, match=r'train.init_from=.*is not a trained run'):
    init_from.resolve(str(tmp_path))
  wider = init(TransformerLM(dataclasses.replace(SMALL, d_model=48)))
  with pytest.raises(ConfigError, match=r'train.init_from=.*has shape \(32,\) there but \(48,\)'):
    init_from.transfer(params, wider, origin=workdir)
  learned = dataclasses.replace(SMALL, pos='learned', max_len=12)
  short = init(TransformerLM(learned))
  longer = init(TransformerLM(dataclasses.replace(learned, max_len=20)), seed=4)
  with pytest.raises(ConfigError, match='train.init_extend_positions=true'):
    init_from.transfer(short, longer)
  grown = init_from.transfer(short, longer, extend_positions=True)['absolute_position']['pos_embedding']
  np.testing.assert_array_equal(grown[:12], short['absolute_position']['pos_embedding'])
  np.testing.assert_array_equal(grown[12:], longer['absolute_position']['pos_embedding'][12:])
  untied = init(TransformerLM(dataclasses.replace(SMALL, tie_embeddings=False)))
  with pytest.raises(ConfigError, match='this model has parameters the run there lacks: output'):
    init_from.transfer(params, untied)
