"""Every invalid model setting raises one ConfigError naming the field, the value and what is allowed."""

import ml_collections
import pytest

from lcr.config import ConfigError, ModelConfig, model_config


@pytest.mark.parametrize('overrides,field', [
    (dict(pos='rotary'), "model.pos='rotary'"),
    (dict(norm='batchnorm'), "model.norm='batchnorm'"),
    (dict(ffn='relu2'), "model.ffn='relu2'"),
    (dict(rope_scaling='ntk-by-parts', rope_original_length=64), "model.rope_scaling="),
    (dict(num_heads=6, num_kv_heads=4, d_model=48), 'model.num_kv_heads=4'),
    (dict(pos='rope', d_model=12, num_heads=4), "model.pos='rope'"),
    (dict(pos='xpos', d_model=20, num_heads=4), "model.pos='xpos'"),
    (dict(d_model=0), 'model.d_model=0'),
    (dict(num_layers=-1), 'model.num_layers=-1'),
    (dict(vocab_size=0), 'model.vocab_size=0'),
    (dict(num_heads=0), 'model.num_heads=0'),
    (dict(rope_factor=0.5), 'model.rope_factor=0.5'),
    (dict(rope_scaling='yarn'), 'model.rope_original_length=0'),
    (dict(pos='alibi', rope_scaling='ntk', rope_original_length=64), "model.rope_scaling='ntk'"),
    (dict(d_model=30, num_heads=4), 'model.d_model=30'),
    (dict(dropout=1.5), 'model.dropout=1.5'),
    (dict(dtype='float8'), "model.dtype='float8'"),
])
def test_invalid_values_name_the_field(overrides, field):
  with pytest.raises(ConfigError) as info:
    ModelConfig(**overrides)
  message = str(info.value)
  assert field in message
  assert 'must' in message or 'allowed' in message or 'needs' in message


def test_unknown_choice_lists_the_allowed_values():
  with pytest.raises(ConfigError, match="'alibi', 'learned', 'none', 'rope', 'sinusoidal', 't5', 'xpos'"):
    ModelConfig(pos='nope')


def test_learned_table_shorter_than_the_requested_length():
  cfg = ModelConfig(pos='learned', max_len=64)
  cfg.check_length(64)
  with pytest.raises(ConfigError, match='model.max_len=64'):
    cfg.check_length(128, 'train.seq_len')
  ModelConfig(pos='alibi', max_len=64).check_length(10 ** 6)


def test_built_from_a_config_dict_with_unknown_fields_rejected():
  cd = ml_collections.ConfigDict({'pos': 'alibi', 'num_layers': 3, 'rope_base': 500000})
  cfg = model_config(cd)
  assert cfg.pos == 'alibi' and cfg.num_layers == 3 and cfg.rope_base == 500000.0
  with pytest.raises(ConfigError, match='model.num_layer does not exist'):
    model_config({'num_layer': 3})
  with pytest.raises(ConfigError, match='model.d_model'):
    model_config({'d_model': 'big'})


def test_derived_sizes():
  cfg = ModelConfig(d_model=96, num_heads=6, num_kv_heads=2, rope_fraction=0.5)
  assert (cfg.head_dim, cfg.kv_heads, cfg.rotary_dim, cfg.hidden_dim) == (16, 2, 8, 384)
  assert ModelConfig(num_kv_heads=0).kv_heads == ModelConfig().num_heads
