"""Test setup: 8 simulated CPU devices (set before JAX is imported) and strict rank promotion."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update('jax_numpy_rank_promotion', 'raise')


import numpy as np  # noqa: E402
import pytest  # noqa: E402


def random_params(cfg, seed: int = 0, scale: float = 0.4):
  """Random parameters of a TransformerLM's shapes, built from the shapes alone (no compilation);
  larger than the initialiser's, so attention is sharp and a wrong key shows in the logits."""
  import flax.linen as nn
  import jax.numpy as jnp
  from lcr.model import TransformerLM
  shapes = jax.eval_shape(
      lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype),
                      nn.meta.unbox(shapes))


@pytest.fixture(scope='session')
def make_params():
  """``make_params(model_config, seed)``: see :func:`random_params`."""
  return random_params
