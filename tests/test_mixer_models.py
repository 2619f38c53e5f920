"""Language models whose blocks mix tokens with lcr.mixers: invariants and the config's guards.

  * Cached decoding (prefill + one token per step, the state in the ``cache`` collection) gives the
    logits of the full forward, for every mixer and memory, with prompts of different lengths in
    one batch and continuations past several segments; the state's size does not grow with the
    number of generated tokens.
  * Changing future tokens never changes past logits; a document packed after another gives the
    logits it gets alone.
  * Invalid settings fail before compiling with one ConfigError naming the field.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr.config import ConfigError, DecodeConfig, ModelConfig, from_config_dict
from lcr.decode import engine
from lcr.model import TransformerLM

from conftest import random_params
from test_decode_cache import assert_close, reference_rows

VOCAB = 29
BASE = dict(vocab_size=VOCAB, num_layers=2, d_model=16, num_heads=2, pos='none')
MODELS = {
    'linear': dict(mixer='linear'),
    'retention': dict(mixer='retention', mixer_chunk=4),
    'ssm': dict(mixer='ssm', ssm_state=4),
    'xl': dict(memory='xl', pos='rope', segment_length=5, memory_length=3),
    'xl-t5': dict(memory='xl', pos='t5', segment_length=4, memory_length=6),
    'infini': dict(memory='infini', pos='alibi', segment_length=4, memory_update='delta'),
}


def config(name, **more):
  return ModelConfig(**{**BASE, **MODELS[name], **more})


@pytest.mark.parametrize('name', MODELS)
def test_prefill_and_steps_equal_the_full_forward(name):
  """Prompts of 3 and 6 tokens continue to 19: past several segments of every memory."""
  cfg = config(name)
  params = random_params(cfg)
  tokens = np.random.default_rng(1).integers(3, VOCAB, size=(2, 19))
  lengths = np.array([3, 6])
  cached = engine.cached_logits(params, cfg, DecodeConfig(), tokens, lengths)
  full = np.asarray(jax.jit(TransformerLM(cfg).apply)({'params': params}, jnp.asarray(tokens)))
  assert_close(cached[:, :13], reference_rows(full, lengths, 13)[:, :13])


@pytest.mark.parametrize('name', MODELS)
def test_decoding_state_does_not_grow_with_the_generated_length(name):
  """The prefill's state for 5 and for 5000 new tokens has the same arrays (no KV cache grows)."""
  cfg = config(name)
  params = random_params(cfg)
  prompt, lengths = jnp.zeros((2, 6), jnp.int32), jnp.array([6, 4])

  def state_shapes(new_tokens):
    stepper = engine.Stepper(cfg, DecodeConfig(max_new_tokens=new_tokens), 6)
    _, state = jax.eval_shape(stepper.prefill, params, prompt, lengths)
    return jax.tree.map(lambda s: (s.shape, s.dtype), state)
  assert state_shapes(5) == state_shapes(5000)


@pytest.mark.parametrize('name', MODELS)
def test_causal_and_packed_documents_stay_isolated(name):
  """One batch, one compilation: rows 0/1 differ only after token 10 (earlier logits must not);
  row 2 packs [doc a | doc b] (positions restart, segment ids 1, 2; a's 7 tokens end mid-segment
  for every memory), rows 3/4 hold a and b alone, right-padded."""
  cfg = config(name)
  params = random_params(cfg, seed=3)
  rng = np.random.default_rng(0)
  t = 17
  tokens = rng.integers(0, VOCAB, size=(5, t))
  tokens[1, :10] = tokens[0, :10]
  tokens[3, :7], tokens[4, :10] = tokens[2, :7], tokens[2, 7:]
  positions = np.tile(np.arange(t), (5, 1))
  positions[2, 7:] = np.arange(10)
  segments = np.ones((5, t), np.int32)
  segments[2, 7:], segments[3, 7:], segments[4, 10:] = 2, 0, 0
  out = np.asarray(jax.jit(TransformerLM(cfg).apply)({'params': params}, tokens, positions,
                                                     segments))
  np.testing.assert_allclose(out[0, :10], out[1, :10], atol=1e-5)
  assert not np.allclose(out[0, 10:], out[1, 10:])
  np.testing.assert_allclose(out[2, :7], out[3, :7], atol=1e-5)
  np.testing.assert_allclose(out[2, 7:], out[4, :10], atol=1e-5)


@pytest.mark.parametrize('overrides,field', [
    (dict(mixer='mamba'), "model.mixer='mamba'"),
    (dict(memory='compressive'), "model.memory='compressive'"),
    (dict(mixer='linear', attention_backend='cpu_flash'), "model.attention_backend='cpu_flash'"),
    (dict(mixer='ssm', attention='sliding', window=8), "model.attention='sliding'"),
    (dict(mixer='retention', pos='rope'), "model.pos='rope'"),
    (dict(mixer='linear', pos='alibi'), "model.pos='alibi'"),
    (dict(mixer='linear', pos='none', num_kv_heads=1), 'model.num_kv_heads=1'),
    (dict(mixer='linear', memory='xl', segment_length=4, memory_length=4), "model.memory='xl'"),
    (dict(memory='xl', segment_length=8, memory_length=0), 'model.memory_length=0'),
    (dict(memory='xl', segment_length=8, memory_length=-2), 'model.memory_length=-2'),
    (dict(memory='infini', segment_length=0), 'model.segment_length=0'),
    (dict(memory='xl', segment_length=8, memory_length=8, pos='learned'), "model.pos='learned'"),
    (dict(memory='xl', segment_length=8, memory_length=8, attention='sinks', window=4),
     "model.attention='sinks'"),
    (dict(memory='infini', segment_length=8, rope_scaling='yarn', rope_original_length=8),
     "model.rope_scaling='yarn'"),
    (dict(memory='infini', segment_length=8, memory_update='hebbian'),
     "model.memory_update='hebbian'"),
    (dict(mixer='ssm', ssm_state=0), 'model.ssm_state=0'),
    (dict(mixer='linear', mixer_chunk=-1), 'model.mixer_chunk=-1'),
    (dict(mixer='ssm', pos='none', context_parallel='ring'), "model.context_parallel='ring'"),
    (dict(memory='infini', segment_length=8, context_parallel='all_gather'),
     "model.context_parallel='all_gather'"),
    (dict(mixer='retention', pos='none', arch='encoder_decoder'), "model.arch='encoder_decoder'"),
    (dict(mixer='linear', pos='none', attention='shifted_sparse'),
     "model.attention='shifted_sparse'"),
])
def test_invalid_settings_name_the_field(overrides, field):
  with pytest.raises(ConfigError) as info:
    ModelConfig(**{**dict(vocab_size=VOCAB, d_model=16, num_heads=2), **overrides})
  assert field in str(info.value) and '\n' not in str(info.value)


def test_contiguous_streams_need_a_recurrent_model():
  with pytest.raises(ConfigError, match='data.contiguous=True'):
    from_config_dict({'data': {'contiguous': True, 'shuffle': False}})
  with pytest.raises(ConfigError, match='data.contiguous=True'):
    from_config_dict({'data': {'contiguous': True}, 'model': {'mixer': 'ssm', 'pos': 'none'}})
  with pytest.raises(ConfigError, match="model.pos='sinusoidal'"):
    from_config_dict({'data': {'contiguous': True, 'shuffle': False},
                      'model': {'mixer': 'ssm', 'pos': 'sinusoidal'}})
  cfg = from_config_dict({'data': {'contiguous': True, 'shuffle': False},
                          'model': {'memory': 'xl', 'segment_length': 8, 'memory_length': 8}})
  assert cfg.data.contiguous and cfg.model.memory == 'xl'


def test_mixer_parameters_replace_attention_and_keep_the_block():
  """The block keeps its norms and FFN; attention's projections give way to each mixer's own
  (RetNet's gate and GroupNorm, Mamba's convolution, Δ projection, A and D); memories keep
  attention's projections (Infini-attention adds its gate), so attention weights load into them."""
  shapes = lambda cfg: nn.meta.unbox(jax.eval_shape(lambda: TransformerLM(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']['layer_0'])
  attention = shapes(ModelConfig(**{**BASE, 'pos': 'rope'}))
  own = {'linear': {'query', 'key', 'value', 'out'},
         'retention': {'query', 'key', 'value', 'gate', 'out', 'norm_scale', 'norm_bias'},
         'ssm': {'in_proj', 'conv_kernel', 'conv_bias', 'x_proj', 'dt_proj', 'A_log', 'D',
                 'out_proj'}}
  for name, params in own.items():
    layer = shapes(config(name))
    assert {'attn_norm', 'ffn_norm', 'ffn', 'mixer'} == set(layer), name
    assert set(layer['mixer']) == params, name
    assert jax.tree.map(lambda s: s.shape, layer['ffn']) == jax.tree.map(
        lambda s: s.shape, attention['ffn'])
  assert set(shapes(config('xl'))['attention']) == set(attention['attention'])
  assert set(shapes(config('infini'))['attention']) == set(attention['attention']) | {'gate'}
  assert shapes(config('ssm', ssm_state=3, ssm_conv=5, ssm_expand=3))['mixer']['A_log'].shape == (48, 3)
  assert shapes(config('ssm', ssm_conv=5))['mixer']['conv_kernel'].shape == (5, 32)


@pytest.mark.parametrize('name', ['retention', 'infini'])
def test_a_stream_fed_in_chunks_scores_as_one_forward(name):
  """lcr.mixers.stream: 37 tokens in calls of 8 (the state carried) give the NLL of one forward;
  softmax attention, whose cache would grow, is refused."""
  from lcr.mixers import stream
  cfg = config(name)
  params = random_params(cfg, seed=4)
  tokens = np.random.default_rng(2).integers(0, VOCAB, size=37)
  logits = np.asarray(jax.jit(TransformerLM(cfg).apply)({'params': params}, tokens[None, :-1]))
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  want = -np.take_along_axis(logp[0], tokens[1:, None], axis=-1).sum()
  got = stream.score(params, cfg, tokens, chunk=8)
  assert got.tokens == 36 and got.nll == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match='bounded state'):
    stream.score(params, ModelConfig(**BASE), tokens, chunk=8)


def test_defaults_are_the_papers():
  """Mamba (Gu & Dao 2023 §3.4 and its reference code): state size N = 16, convolution width 4,
  expansion E = 2, Δ's rank ⌈D/16⌉ (0 here); the block's mixer is attention unless asked."""
  cfg = ModelConfig()
  assert (cfg.ssm_state, cfg.ssm_conv, cfg.ssm_expand, cfg.ssm_dt_rank) == (16, 4, 2, 0)
  assert (cfg.mixer, cfg.memory, cfg.memory_update, cfg.mixer_chunk) == ('attention', 'none',
                                                                         'linear', 0)
