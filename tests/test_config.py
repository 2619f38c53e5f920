"""Top-level Config, TrainConfig, MeshConfig, config files and --config overrides."""

import dataclasses
import json

import jax
import ml_collections
import pytest

from lcr import cli, step
from lcr import config as C


def test_base_config_builds_the_defaults_and_round_trips_through_json():
  """Invariants only: configs/base.py is the dataclass defaults by construction, and a config
  survives JSON (config.json); the default numbers themselves are pinned in test_defaults.py."""
  cd = cli.load_config_dict('configs/base.py')
  cfg = C.from_config_dict(cd)
  assert cfg == C.Config()
  smoke = cli.load('configs/lm.py:smoke', ['eval.lengths=(64, 128)', 'mesh.shape=(2,2,2)'])
  assert C.from_config_dict(json.loads(json.dumps(C.to_dict(smoke)))) == smoke


def test_fields_users_rely_on_exist():
  cfg = cli.load('configs/lm.py:smoke')
  for path in ('seed', 'model.pos', 'model.rope_scaling', 'model.num_layers', 'model.d_model',
               'model.num_heads', 'model.num_kv_heads', 'train.steps', 'train.batch_size',
               'train.seq_len', 'train.lr', 'train.log_every', 'train.checkpoint_every',
               'train.eval_every', 'train.keep_checkpoints', 'mesh.shape', 'mesh.axes', 'mesh.rules',
               'data.corpus', 'data.tokenizer', 'eval.lengths'):
    node = cfg
    for part in path.split('.'):
      node = getattr(node, part)


@pytest.mark.parametrize('preset', ['smoke', 'cpu', 'gpu', 'tpu', 'long'])
def test_presets_build(preset):
  cfg = cli.load(f'configs/lm.py:{preset}')
  assert cfg.train.steps > 0


def test_tpu_preset_has_about_125m_parameters():
  cfg = cli.load('configs/lm.py:tpu')
  model = step.TransformerLM(dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size))
  n = sum(x.size for x in jax.tree.leaves(step.abstract_params(model, 16)))
  assert 110e6 < n < 140e6, n


@pytest.mark.parametrize('top, message', [
    ({'sed': 1}, 'config field sed does not exist; top-level fields are: data, decode, eval, mesh'),
    ({'train': {'stpes': 1}}, 'config field train.stpes does not exist'),
    ({'mesh': {'shape': (-1, -1, 1)}}, 'at most one size may be -1'),
    ({'mesh': {'shape': (2, 2)}}, r'mesh.shape=\(2, 2\) is invalid: needs one size per axis'),
    ({'mesh': {'shape': (0, 1, 1)}}, 'sizes must be positive integers'),
    ({'mesh': {'rules': (('batch', 'pipeline'),)}}, "names mesh axis 'pipeline'"),
    ({'train': {'batch_size': 0}}, 'train.batch_size=0 is invalid: must be > 0'),
    ({'train': {'warmup_steps': -1}}, 'train.warmup_steps=-1 is invalid: must be >= 0'),
    ({'train': {'min_lr_ratio': 2.0}}, r'train.min_lr_ratio=2.0 is invalid: must be in \[0.0, 1.0\]'),
    ({'model': {'pos': 'learned', 'max_len': 64}, 'train': {'seq_len': 128}},
     'train.seq_len=128 is invalid: model.pos=learned has a table of model.max_len=64'),
    ({'seed': 'zero'}, "seed='zero' is invalid"),
])
def test_bad_values_name_the_field(top, message):
  with pytest.raises(C.ConfigError, match=message):
    C.from_config_dict(top)


def test_mesh_rules_from_json_lists_become_tuples():
  mesh = C.from_config_dict({'mesh': {'rules': [['batch', ['data', 'fsdp']], ['embed', None]]}}).mesh
  assert mesh.rules == (('batch', ('data', 'fsdp')), ('embed', None))
  assert mesh.axes_of('batch') == ('data', 'fsdp') and mesh.axes_of('embed') == ()
  assert mesh.axes_of('vocab') == ()


def test_overrides_parse_to_the_field_type():
  cfg = cli.load('configs/lm.py:smoke', [
      'mesh.shape=(2,2,2)', 'eval.lengths=64', 'train.lr=1', 'train.steps=1e3',
      'train.tensorboard=false', 'model.pos=alibi', 'seed=7'])
  assert cfg.mesh.shape == (2, 2, 2) and cfg.eval.lengths == (64,)
  assert cfg.train.lr == 1.0 and cfg.train.steps == 1000 and cfg.train.tensorboard is False
  assert cfg.model.pos == 'alibi' and cfg.seed == 7
  words = cli.load('configs/lm.py:smoke', ['eval.protocols=sliding',
                                          'eval.rope_scalings=linear, yarn'])
  assert words.eval.protocols == ('sliding',) and words.eval.rope_scalings == ('linear', 'yarn')
  quoted = cli.load('configs/lm.py:smoke', ["eval.protocols=('nonoverlapping',)"])
  assert quoted.eval.protocols == ('nonoverlapping',)


@pytest.mark.parametrize('override, message', [
    ('model.nope=1', 'config field model.nope does not exist .*fields of model are: .*d_model'),
    ('nope.x=1', 'config field nope.x does not exist .*fields of the config are: data, decode, eval'),
    ('seed.x=1', 'seed is a value, not a section'),
    ('train.steps=many', "train.steps='many' is invalid: expected an integer"),
    ('train.tensorboard=maybe', 'expected true or false'),
    ('train.lr', 'expected --config.FIELD=VALUE'),
])
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises(C.ConfigError, match=message):
    cli.load('configs/lm.py:smoke', [override])


def test_config_file_errors():
  with pytest.raises(C.ConfigError, match="unknown preset 'huge'; presets of configs/lm.py are"):
    cli.load('configs/lm.py:huge')
  with pytest.raises(C.ConfigError, match='no such config file'):
    cli.load('configs/none.py')


def test_split_override_args_accepts_both_flag_forms():
  rest, overrides = cli.split_override_args(
      ['run.py', '--config=configs/lm.py', '--config.train.steps=5', '--config.model.pos', 'alibi',
       '--workdir=/tmp/x'])
  assert rest == ['run.py', '--config=configs/lm.py', '--workdir=/tmp/x']
  assert overrides == ['train.steps=5', 'model.pos=alibi']


def test_config_dict_and_plain_dict_agree():
  cd = ml_collections.ConfigDict({'seed': 3, 'train': {'steps': 5}})
  assert C.from_config_dict(cd) == C.from_config_dict({'seed': 3, 'train': {'steps': 5}})
