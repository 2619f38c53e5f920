"""Causal linear attention: Katharopoulos et al. 2020, "Transformers are RNNs" (§3.2–3.4).

softmax(q·k) is replaced by the kernel φ(q)ᵀφ(k) with φ(x) = elu(x) + 1 (eq. 7), so causal attention

    V'_i = φ(Q_i)ᵀ S_i / φ(Q_i)ᵀ Z_i,   S_i = Σ_{j≤i} φ(K_j) V_jᵀ,   Z_i = Σ_{j≤i} φ(K_j)

is an RNN with state (S, Z) (§3.4). The **parallel** form computes (φ(Q)φ(K)ᵀ ⊙ M) V for a causal,
same-document mask M; the **recurrent** form updates S and Z one token at a time (a decoding
step); ``model.mixer_chunk`` = c runs the parallel form within chunks of c tokens and the recurrent
form across them (constant memory in the length). All three agree (tests/test_mixers.py).
No positional encoding acts here (the paper uses none): causality alone orders the tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.mixers import heads, state


def causal_same_document(tok: state.Tokens) -> jax.Array:
  """[B, T, T] bool: key j ≤ query i, both of one document, the key real."""
  t = tok.pos.shape[1]
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  return causal[None] & (tok.doc[:, :, None] == tok.doc[:, None, :]) & tok.real[:, None, :]


def linear_attention_chunk(st: dict[str, jax.Array], fq, fk, v, tok: state.Tokens):
  """One chunk: fq/fk = φ(q)/φ(k) [B,T,H,D] float32, v [B,T,H,D]; state kv [B,H,D,D],
  normaliser [B,H,D], doc [B]. Returns (out [B,T,H,D] float32, new state)."""
  v = v.astype(jnp.float32)
  continues = (tok.real & (tok.doc == st['doc'][:, None])).astype(jnp.float32)   # [B, T]
  scores = jnp.einsum('bthd,bshd->bhts', fq, fk) * causal_same_document(tok)[:, None]
  num = (jnp.einsum('bhts,bshd->bthd', scores, v)
         + continues[..., None, None] * jnp.einsum('bthd,bhde->bthe', fq, st['kv']))
  den = (jnp.einsum('bhts->bth', scores)
         + continues[..., None] * jnp.einsum('bthd,bhd->bth', fq, st['normaliser']))
  out = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  last_doc = tok.last(tok.doc)
  kept = (last_doc == st['doc']).astype(jnp.float32)[:, None, None]
  weight = (tok.real & (tok.doc == last_doc[:, None])).astype(jnp.float32)         # [B, T]
  new = {'kv': kept[..., None] * st['kv'] + jnp.einsum('bthd,bthe,bt->bhde', fk, v, weight),
         'normaliser': kept * st['normaliser'] + jnp.einsum('bthd,bt->bhd', fk, weight),
         'doc': last_doc}
  return out, new


class LinearAttention(nn.Module):
  """Causal linear attention with the projections of softmax attention (see module doc)."""
  cfg: ModelConfig
  cache: CacheLayout | None = None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table=None, *,
               fresh_cache: bool = False) -> jax.Array:
    cfg = self.cfg
    q, k, v = heads.qkv(cfg, x_BxTxD)
    b, h, d = x_BxTxD.shape[0], cfg.num_heads, cfg.head_dim
    start, store = state.load(self, self.cache is not None, fresh_cache, {
        'kv': state.Spec((b, h, d, d), jnp.float32, ('batch', 'heads', 'kv', None)),
        'normaliser': state.Spec((b, h, d), jnp.float32, ('batch', 'heads', 'kv')),
        'doc': state.Spec((b,), jnp.int32, ('batch',))})
    tok = state.tokens(positions_BxT, segments_BxT)
    out, final = state.over_chunks(
        linear_attention_chunk, start, (heads.elu_plus_one(q), heads.elu_plus_one(k), v), tok,
        cfg.mixer_chunk)
    store(final)
    return heads.output(cfg, out.astype(x_BxTxD.dtype))
