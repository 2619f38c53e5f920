"""LongLoRA's shifted sparse attention (S²-Attn) against a NumPy restatement of the paper.

The reference follows the pseudo-code of Chen et al. 2024 (LongLoRA) §3.2, Algorithm 1: the second
half of the heads has its tokens rolled by −G/2, every group of G consecutive (rolled) tokens
attends causally within itself, and the output is rolled back. It shares no code with lcr.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import attention, evaluate, positional
from lcr.attention import MaskSpec, cpu_flash
from lcr.config import ConfigError, EvalConfig, ModelConfig


def longlora_visible(n: int, group: int, heads: int) -> np.ndarray:
  """[H, N, N] bool: may token i see token j in head h, by the paper's roll-and-group code."""
  out = np.zeros((heads, n, n), bool)
  index = np.arange(n)
  for h in range(heads):
    shift = group // 2 if h >= heads // 2 else 0
    rolled = (index - shift) % n            # qkv.roll(-G/2, 1): token i sits at index i − G/2
    same_group = rolled[:, None] // group == rolled[None, :] // group
    causal_in_group = rolled[None, :] <= rolled[:, None]
    out[h] = same_group & causal_in_group
  return out


def lcr_visible(n: int, group: int, heads: int, segments=None) -> np.ndarray:
  """[B, H, N, N] from lcr's 'grouped' halves of a 'shifted_sparse' MaskSpec."""
  pos = np.arange(n)[None] if segments is None else _positions(segments)
  seg = None if segments is None else jnp.asarray(segments)
  halves = attention.half_head_specs(MaskSpec('shifted_sparse', block=group))
  per_half = [np.asarray(s.visible(jnp.asarray(pos), jnp.asarray(pos), seg, seg)) for s in halves]
  return np.stack([per_half[h >= heads // 2] for h in range(heads)], axis=1)


def _positions(segments):
  """Positions restarting at every document of each row."""
  out = np.zeros(segments.shape, int)
  for b, row in enumerate(segments):
    for i in range(1, len(row)):
      out[b, i] = out[b, i - 1] + 1 if row[i] == row[i - 1] else 0
  return out


def test_groups_and_shift_are_the_papers_without_its_wrap_around():
  n, group, heads = 32, 8, 4
  paper = longlora_visible(n, group, heads)
  ours = lcr_visible(n, group, heads)[0]
  causal = np.tril(np.ones((n, n), bool))
  np.testing.assert_array_equal(ours, paper & causal)
  # Where they differ: the roll wraps the last G/2 tokens into the first group, where the first
  # G/2 tokens (of the shifted heads only) see them although they come later.
  leak = paper & ~causal
  wrapped = np.zeros_like(leak)
  wrapped[heads // 2:, :group // 2, n - group // 2:] = True
  np.testing.assert_array_equal(leak, wrapped)
  # The unshifted heads attend within [0, 8), [8, 16), ...; the shifted ones within [4, 12), ...
  assert ours[0, 7, 0] and not ours[0, 8, 7] and ours[2, 8, 4] and not ours[2, 4, 3]


def test_groups_restart_in_each_packed_document():
  segments = np.array([[1] * 11 + [2] * 13])
  vis = lcr_visible(24, 8, 2, segments)[0]
  assert not vis[:, 11:, :11].any()                     # never across documents
  # The second document's groups start at its own position 0 (index 11), shifted by 4 in head 1.
  assert vis[0, 11 + 7, 11] and not vis[0, 11 + 8, 11 + 7]
  assert vis[1, 11 + 3, 11] and not vis[1, 11 + 4, 11 + 3]


def reference_attention(q, k, v, visible_BxHxTxS, bias=None):
  h, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  s = np.einsum('bthd,bshd->bhts', q, k) * q.shape[-1] ** -0.5
  s = s + (0.0 if bias is None else bias)
  s = np.where(visible_BxHxTxS, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', p / p.sum(-1, keepdims=True), v)


BACKENDS = ['xla', 'chunked'] + ([] if cpu_flash.unavailable() else ['cpu_flash'])


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kv_heads, alibi', [(2, False), (1, True)])
def test_every_backend_runs_the_pattern(backend, kv_heads, alibi):
  """Odd length, two packed documents, GQA or MQA (K/V repeated per half), ALiBi per head."""
  if backend == 'cpu_flash' and alibi:
    pytest.skip('cpu_flash takes no logit bias')
  heads, d, group = 4, 16, 6
  segments = np.array([[1] * 9 + [2] * 12, [1] * 21])
  pos = _positions(segments)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 21, heads, d)).astype(np.float32)
  k, v = rng.normal(size=(2, 2, 21, kv_heads, d)).astype(np.float32)
  bias_fn = positional.alibi_bias(heads) if alibi else None

  @jax.jit
  def run(q, k, v, pos, segments):
    return attention.attend(q, k, v, q_pos=pos, k_pos=pos, q_segments=segments, k_segments=segments,
                            bias_fn=bias_fn, mask=MaskSpec('shifted_sparse', block=group), chunk=8,
                            backend=backend)
  out = run(*(jnp.asarray(x) for x in (q, k, v, pos, segments)))
  # The definition on positions: group id (p − shift) // G, shift G/2 in the second half of heads.
  shift = np.where(np.arange(heads) >= heads // 2, group // 2, 0)[None, :, None]
  gid = (pos[:, None, :] - shift) // group                                    # [B, H, T]
  visible = ((gid[..., :, None] == gid[..., None, :]) & (pos[:, None, None, :] <= pos[:, None, :, None])
             & (segments[:, None, :, None] == segments[:, None, None, :]))
  bias = None
  if alibi:
    slopes = positional.alibi_slopes(heads)[None, :, None, None]
    bias = -slopes * (pos[:, None, :, None] - pos[:, None, None, :])
  want = reference_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                             visible, bias)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_model_trains_with_it_and_evaluates_with_full_attention():
  from lcr.model import TransformerLM
  cfg = ModelConfig(vocab_size=17, num_layers=1, d_model=32, num_heads=2, pos='rope',
                    attention='shifted_sparse', attention_block=4, attention_backend='xla')
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 17, size=(1, 12)))
  params = jax.jit(TransformerLM(cfg).init)(jax.random.key(0), tokens)['params']
  sparse = jax.jit(TransformerLM(cfg).apply)({'params': params}, tokens)
  causal = jax.jit(TransformerLM(dataclasses.replace(cfg, attention='causal')).apply)(
      {'params': params}, tokens)
  np.testing.assert_allclose(sparse[:, :2], causal[:, :2], atol=1e-6)   # same first group
  assert not np.allclose(sparse[:, -1], causal[:, -1], atol=1e-4)       # sees fewer tokens
  evaluator = evaluate.Evaluator(params, cfg, EvalConfig(), 12)
  assert evaluator.model_cfg.attention == 'causal'


@pytest.mark.parametrize('field, overrides', [
    ('model.attention_block', dict(attention='shifted_sparse')),
    ('model.attention_block', dict(attention='shifted_sparse', attention_block=5)),
    ('model.num_heads', dict(attention='shifted_sparse', attention_block=4, d_model=48, num_heads=3)),
])
def test_config_errors_name_the_field(field, overrides):
  with pytest.raises(ConfigError, match=field):
    ModelConfig(**overrides)
