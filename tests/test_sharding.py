"""The device mesh from config, its errors, and a sharded train step against the single-device one."""

import jax
import numpy as np
import pytest

from lcr import config as C
from lcr import sharding, step
from lcr.data.config import DataConfig


def tiny_config(shape=(2, 2, 2), **model) -> C.Config:
  model = dict(dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    pos='rope'), **model)
  return C.Config(
      seed=3, model=C.ModelConfig(**model), data=DataConfig(),
      train=C.TrainConfig(batch_size=8, seq_len=16, steps=10, warmup_steps=0, lr=1e-3,
                          weight_decay=0.1),
      mesh=C.MeshConfig(shape=shape))


def random_batch(cfg: C.Config, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  # Two packed documents per row: positions restart and segment ids change at a random cut.
  cut = rng.integers(1, t, b)[:, None]
  cols = np.arange(t)[None, :]
  weights = np.ones((b, t), np.float32)
  weights[0, -3:] = 0.0    # a padded tail
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.where(cols < cut, cols, cols - cut).astype(np.int32),
              segment_ids=np.where(cols < cut, 1, 2).astype(np.int32), weights=weights)


def test_resolve_shape_fills_the_remaining_devices():
  assert sharding.resolve_shape(C.MeshConfig(shape=(-1, 2, 1)), 8) == (4, 2, 1)
  assert sharding.resolve_shape(C.MeshConfig(shape=(2, 2, 2)), 8) == (2, 2, 2)


@pytest.mark.parametrize('shape, devices', [((2, 2, 2), 4), ((3, -1, 1), 8), ((1, 1, 1), 2)])
def test_mesh_that_does_not_fit_the_devices_names_mesh_shape(shape, devices):
  with pytest.raises(C.ConfigError, match=r'mesh\.shape'):
    sharding.resolve_shape(C.MeshConfig(shape=shape), devices)


def test_batch_not_divisible_by_data_parallel_size_names_train_batch_size():
  mesh = sharding.make_mesh(C.MeshConfig(shape=(4, 2, 1)))
  with pytest.raises(C.ConfigError, match=r'train\.batch_size=12 .*data-parallel size 8'):
    sharding.check_batch(mesh, C.MeshConfig(shape=(4, 2, 1)), 12)
  sharding.check_batch(mesh, C.MeshConfig(shape=(4, 2, 1)), 16)


def test_parameters_follow_the_logical_axis_rules():
  cfg = tiny_config()
  trainer = step.make_trainer(cfg)
  specs = jax.tree.map(lambda s: tuple(s.spec), trainer.state_sharding.params)
  layer = specs['layer_0']
  assert layer['attention']['query']['kernel'] == ('fsdp', 'tensor', None)      # embed, heads, kv
  assert layer['ffn']['wo']['kernel'] == ('tensor', 'fsdp')                      # mlp, embed
  assert specs['token_embedding']['embedding'] == ('tensor', 'fsdp')             # vocab, embed
  # The optimizer's moments are sharded like the parameters they belong to.
  mu = trainer.state_sharding.opt_state[1][0].mu
  assert tuple(mu['layer_0']['ffn']['wo']['kernel'].spec) == ('tensor', 'fsdp')


def test_a_dimension_the_mesh_does_not_divide_is_replicated():
  # One K/V head (multi-query) cannot be split over tensor=2; vocab 63 neither.
  trainer = step.make_trainer(tiny_config(num_kv_heads=1, vocab_size=63))
  params = trainer.state_sharding.params
  assert tuple(params['layer_0']['attention']['key']['kernel'].spec) == ('fsdp', None, None)
  assert tuple(params['token_embedding']['embedding'].spec) == (None, 'fsdp')


def test_sharded_step_equals_single_device_step():
  """An invariant is the only reference here: a step sharded over a (2, 2, 2) mesh of 8 devices
  gives the single-device step's loss, gradient norm and parameters."""
  cfg = tiny_config()
  sharded = step.make_trainer(cfg)
  single_cfg = tiny_config(shape=(1, 1, 1))
  single = step.make_trainer(
      single_cfg, mesh=sharding.make_mesh(single_cfg.mesh, devices=jax.devices()[:1]))
  assert dict(sharded.mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}

  state8, state1 = sharded.init_state(), single.init_state()
  kernel = state8.params['layer_0']['ffn']['wi']['kernel']
  assert kernel.addressable_shards[0].data.shape == (16, 64)   # [32, 128] split 2 × 2: really sharded
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(state1.params['layer_0']['ffn']['wi']['kernel']))

  initial = jax.tree.leaves(jax.device_get(state1.params))
  batch = random_batch(cfg)
  state8, m8 = sharded.train_step(state8, sharding.global_batch(batch, sharded.batch_sharding))
  state1, m1 = single.train_step(state1, sharding.global_batch(batch, single.batch_sharding))
  for name in ('loss', 'grad_norm'):
    np.testing.assert_allclose(float(m8[name]), float(m1[name]), rtol=1e-5)
  assert float(m8['loss']) > 0
  flat8, flat1 = jax.tree.leaves(jax.device_get(state8.params)), jax.tree.leaves(
      jax.device_get(state1.params))
  for p8, p1, p0 in zip(flat8, flat1, initial):
    np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(p1, p0) for p1, p0 in zip(flat1, initial))   # the step moved them


def test_activation_constraints_reach_the_compiled_step(capfd):
  cfg = tiny_config(pos='learned', max_len=16)
  trainer = step.make_trainer(cfg)
  batch = sharding.global_batch(random_batch(cfg), trainer.batch_sharding)
  lowered = trainer.train_step.lower(trainer.abstract_state(), batch)
  # The queries [batch=8, length=16, heads=4, kv=8]: rows over (data, fsdp), heads over tensor.
  assert ('[{"data", "fsdp"}, {}, {"tensor"}, {}]> : tensor<8x16x4x8xf32>'
          in lowered.as_text()), 'the model\'s with_logical_constraint calls were not applied'
  lowered.compile()
  # Every constraint is one the partitioner can meet without replicating a tensor first.
  assert 'Involuntary full rematerialization' not in capfd.readouterr().err


@pytest.mark.parametrize('address, processes, process_id, message', [
    (None, 2, 0, 'need --coordinator_address'),
    ('localhost:1234', None, None, 'needs --num_processes and --process_id'),
    ('localhost:1234', 2, 2, r'--process_id=2 must be in \[0, --num_processes=2\)'),
])
def test_inconsistent_multi_process_flags_are_explained(address, processes, process_id, message):
  with pytest.raises(C.ConfigError, match=message):
    sharding.initialize_distributed(address, processes, process_id)
