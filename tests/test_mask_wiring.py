"""The attention pattern a ModelConfig asks for, as lcr applies it, against the papers' masks.

The reference is ``test_attention.reference_mask``, written pair by pair from each paper's
definition in NumPy. Here the config's values are read into it by hand (``paper_spec``), never
through ``mask_from_config``, so a field that ``mask_from_config`` or the model passes wrongly,
or not at all, changes what the model sees and fails a test.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import attention, config
from lcr.config import ModelConfig
from lcr.model import TransformerLM
from test_attention import reference_mask

# A distinct value for every pattern field, so two fields swapped give another mask.
FIELDS = dict(window=5, global_tokens=2, sink_tokens=3, attention_block=4, bigbird_random_blocks=2,
              bigbird_seed=7)
# The fields each pattern reads (MaskSpec names, as in the papers' definitions).
READS = {'causal': (), 'sliding': ('window',), 'longformer': ('window', 'global_tokens'),
         'bigbird': ('block', 'global_tokens', 'random_blocks', 'seed'),
         'sinks': ('window', 'sink_tokens'), 'blockwise': ('block',), 'grouped': ('block',),
         'shifted_sparse': ('block',)}
T = 32
# Row 0 packs two documents (positions restart at 13: global and sink tokens are per document).
POSITIONS = np.stack([np.r_[np.arange(13), np.arange(T - 13)], np.arange(T)])
SEGMENTS = np.stack([np.r_[[1] * 13, [2] * (T - 13)], np.ones(T, int)])


def paper_spec(variant: str, causal: bool = True, **fields) -> types.SimpleNamespace:
  """The pattern with the config's values, field by field as the papers name them."""
  f = {**FIELDS, **fields}
  return types.SimpleNamespace(
      kind='dense' if variant == 'causal' else variant, causal=causal, window=f['window'],
      global_tokens=f['global_tokens'], sink_tokens=f['sink_tokens'], block=f['attention_block'],
      random_blocks=f['bigbird_random_blocks'], seed=f['bigbird_seed'], shift=0)


def paper_mask(spec) -> np.ndarray:
  """[B, T, S]; for S²-Attn [B, 2, T, S], one mask per half of the heads (LongLoRA §3.2: the
  second half's groups are shifted by half a group)."""
  if spec.kind == 'shifted_sparse':
    halves = [types.SimpleNamespace(**{**vars(spec), 'kind': 'grouped', 'shift': shift})
              for shift in (0, spec.block // 2)]
    return np.stack([paper_mask(h) for h in halves], axis=1)
  return reference_mask(spec, POSITIONS, POSITIONS, SEGMENTS, SEGMENTS, kv_len=T)


def visible(spec) -> np.ndarray:
  """What lcr's MaskSpec lets through, in paper_mask's layout."""
  if spec.pattern.shifts_half_heads:
    return np.stack([visible(h) for h in attention.half_head_specs(spec)], axis=1)
  return np.asarray(spec.visible(POSITIONS, POSITIONS, SEGMENTS, SEGMENTS, kv_len=T))


CONFIG_NAME = {'window': 'window', 'global_tokens': 'global_tokens', 'sink_tokens': 'sink_tokens',
               'block': 'attention_block', 'random_blocks': 'bigbird_random_blocks',
               'seed': 'bigbird_seed'}


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('variant', config.ATTENTION_VARIANTS)
def test_mask_from_config_passes_every_field(variant, causal):
  cfg = ModelConfig(attention=variant, **FIELDS)
  spec = attention.mask_from_config(cfg, causal=causal)
  want = paper_spec(variant, causal)
  assert (spec.kind, spec.causal) == (want.kind, want.causal)
  for name in CONFIG_NAME:
    assert getattr(spec, name) == getattr(want, name), name
  np.testing.assert_array_equal(visible(spec), paper_mask(want))
  for name in READS[variant]:   # each field the pattern reads changes its mask here
    other = paper_spec(variant, causal, **{CONFIG_NAME[name]: FIELDS[CONFIG_NAME[name]] + 1})
    assert not np.array_equal(paper_mask(other), paper_mask(want)), name


@pytest.fixture(scope='module')
def params():
  """One set of parameters serves every pattern (a pattern adds none)."""
  model = TransformerLM(ModelConfig(vocab_size=23, num_layers=1, d_model=32, num_heads=2))
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']


@pytest.mark.parametrize('variant', config.ATTENTION_VARIANTS)
def test_model_sees_exactly_the_keys_of_its_pattern(variant, params):
  """One layer: the logits at query i change when token j changes iff the paper's mask lets i see
  j. Row 0 of each group is the original; row 1 + j has token j replaced (one forward pass)."""
  model = TransformerLM(ModelConfig(vocab_size=23, num_layers=1, d_model=32, num_heads=2,
                                    attention=variant, **FIELDS))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 23, size=(2, T))
  batch = np.repeat(tokens, T + 1, axis=0).reshape(2, T + 1, T)
  j = np.arange(T)
  batch[:, 1 + j, j] = (tokens + rng.integers(1, 23, size=(2, T))) % 23
  rep = lambda x: np.repeat(x, T + 1, axis=0)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, batch.reshape(-1, T),
                                           rep(POSITIONS), rep(SEGMENTS)))
  logits = logits.reshape(2, T + 1, T, -1)
  changed = np.abs(logits[:, 1:] - logits[:, :1]).max(-1) > 1e-6      # [row, j, i]
  want = paper_mask(paper_spec(variant))
  if variant == 'shifted_sparse':   # two heads, one per half: query i depends on j if either sees it
    want = want.any(axis=1)
  np.testing.assert_array_equal(changed.transpose(0, 2, 1), want)
