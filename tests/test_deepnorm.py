"""DeepNorm (Wang et al. 2022): α and β against the decoder-only formulas, which kernels start
scaled by β, and x ← LN(α·x + f(x)) in the model, checked through LayerNorm's scale invariance."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import config as C
from lcr import layers
from lcr.model import TransformerLM

TINY = dict(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=48, pos='rope')


def init(**fields):
  cfg = C.ModelConfig(**{**TINY, **fields})
  model = TransformerLM(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model, nn.meta.unbox(model.init(jax.random.key(0), tokens)['params'])


@pytest.mark.parametrize('n, alpha, beta', [
    (2, math.sqrt(2.0), 0.5),                    # (2·2)^(1/4) = √2, (8·2)^(−1/4) = 16^(−1/4)
    (12, 2.2133638394, 0.3194715521),            # 24^(1/4), 96^(−1/4)
    (24, 2.6321480259, 0.2686424830),            # 48^(1/4), 192^(−1/4)
])
def test_alpha_and_beta_follow_the_decoder_only_formulas(n, alpha, beta):
  assert layers.deepnorm_alpha(n) == pytest.approx((2 * n) ** 0.25, rel=1e-12)
  assert layers.deepnorm_beta(n) == pytest.approx((8 * n) ** -0.25, rel=1e-12)
  assert layers.deepnorm_alpha(n) == pytest.approx(alpha, rel=1e-9)
  assert layers.deepnorm_beta(n) == pytest.approx(beta, rel=1e-9)


@pytest.mark.parametrize('ffn', ['mlp', 'swiglu', 'moe'])
def test_value_output_and_ffn_kernels_start_scaled_by_beta(ffn):
  extra = dict(moe=C.MoeConfig(num_experts=2)) if ffn == 'moe' else {}
  _, deep = init(num_layers=3, norm_placement='deepnorm', ffn=ffn, **extra)
  _, pre = init(num_layers=3, norm_placement='pre', ffn=ffn, **extra)
  beta = (8 * 3) ** -0.25          # N = 3 layers
  assert 'final_norm' not in deep and 'final_norm' in pre      # post-norm: no final norm
  scaled = {'wi', 'wo', 'wi_gate', 'wi_up'}
  for i in range(3):
    d_layer, p_layer = deep[f'layer_{i}'], pre[f'layer_{i}']
    for name in ('query', 'key'):
      np.testing.assert_array_equal(d_layer['attention'][name]['kernel'],
                                    p_layer['attention'][name]['kernel'])
    for name in ('value', 'out'):
      np.testing.assert_allclose(d_layer['attention'][name]['kernel'],
                                 beta * p_layer['attention'][name]['kernel'], rtol=1e-6)
    for name, value in d_layer['ffn'].items():
      got = value['kernel'] if isinstance(value, dict) else value
      want = p_layer['ffn'][name]['kernel'] if isinstance(value, dict) else p_layer['ffn'][name]
      np.testing.assert_allclose(got, (beta if name in scaled else 1.0) * want, rtol=1e-6)
    assert scaled & set(d_layer['ffn'])
  np.testing.assert_array_equal(deep['token_embedding']['embedding'],
                                pre['token_embedding']['embedding'])
  # Absolute scale: Xavier's uniform bound √(6 / (fan_in + fan_out)) times β, nearly reached.
  value = deep['layer_0']['attention']['value']['kernel']                # [32, 2 heads, 8]
  bound = beta * math.sqrt(6.0 / (32 + 16))
  assert bound * 0.9 < np.abs(value).max() <= bound


def test_the_placement_registry_and_the_config_agree():
  assert set(layers.RESIDUALS) == set(C.NORM_PLACEMENTS)


def test_deepnorm_residual_is_layernorm_of_alpha_x_plus_f():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  cfg = C.ModelConfig(**{**TINY, 'num_layers': 6, 'norm_placement': 'deepnorm'})
  norm = layers.norm(cfg, 'n')
  params = norm.init(jax.random.key(0), jnp.asarray(x))

  def residual(x):
    return layers.RESIDUALS['deepnorm'](cfg, x, lambda h: jnp.tanh(h), norm.bind(params))
  y = (12 ** 0.25) * x + np.tanh(x)
  want = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(residual(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5)


def test_deepnorm_model_equals_post_norm_with_branch_outputs_divided_by_alpha():
  """LN(α·x + f(x)) = LN(x + f(x)/α) (LayerNorm is scale invariant), and attention and FFN are
  linear in their output kernels: a DeepNorm model is a post-norm model with those kernels / α."""
  deep_model, params = init(num_layers=2, norm_placement='deepnorm')
  post_model, _ = init(num_layers=2, norm_placement='post')
  alpha = 4 ** 0.25
  post_params = jax.tree_util.tree_map_with_path(
      lambda path, v: v / alpha if jax.tree_util.keystr(path).endswith(
          ("['out']['kernel']", "['wo']['kernel']")) else v, params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 40, size=(2, 11)))
  deep = jax.jit(deep_model.apply)({'params': params}, tokens)
  post = jax.jit(post_model.apply)({'params': post_params}, tokens)
  np.testing.assert_allclose(np.asarray(deep), np.asarray(post), rtol=1e-4, atol=1e-4)
  plain = jax.jit(post_model.apply)({'params': params}, tokens)
  assert not np.allclose(np.asarray(deep), np.asarray(plain), atol=1e-3)
