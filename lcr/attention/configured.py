"""Attention as a ModelConfig configures it: rotary encodings, pattern, backend, dynamic NTK."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcr import attention, positional
from lcr.attention import per_query_rope
from lcr.config import ModelConfig


def attend(cfg: ModelConfig, q, k, v, q_pos, k_pos, q_seg, k_seg, bias_fn, *,
           rotate: bool = True, enc_q_pos=None, enc_k_pos=None, seq_len=None,
           causal: bool = True) -> jax.Array:
  """Attention of the configured pattern and backend, rotating q and k for rotary encodings.

  q/k come unrotated when ``rotate``; ``enc_q_pos``/``enc_k_pos`` are the positions the encoding
  sees (default: the positions the mask sees). Dynamic NTK is exact per query (each query's keys
  rotated with the base of its own length, lcr.attention.per_query_rope), unless ``seq_len`` [B]
  fixes one base per row (the rotated-key cache of Hugging Face's generate). ``causal=False``: the
  pattern without its causal term (an encoder); ``bias_fn`` must then be the bidirectional one.
  """
  enc_q_pos = q_pos if enc_q_pos is None else enc_q_pos
  enc_k_pos = k_pos if enc_k_pos is None else enc_k_pos
  mask = attention.mask_from_config(cfg, causal=causal)
  length_scale_base = cfg.length_scale_base if cfg.length_scaled_logits else 0
  if rotate and positional.kind(cfg) == 'rotary':
    if cfg.rope_scaling == 'dynamic_ntk' and seq_len is None:
      if length_scale_base:
        q = (q.astype(jnp.float32)
             * attention.length_scale(q_pos, length_scale_base)[:, :, None, None]).astype(q.dtype)
      return per_query_rope.attention(
          q, k, v, inv_freq_BxTxR=positional.dynamic_inv_freq(cfg, enc_q_pos + 1), q_pos=q_pos,
          k_pos=k_pos, q_segments=q_seg, k_segments=k_seg, mask=mask)
    q, k = positional.rotate(cfg, q, k, enc_q_pos, enc_k_pos, seq_len=seq_len)
  return attention.attend(
      q, k, v, q_pos=q_pos, k_pos=k_pos, q_segments=q_seg, k_segments=k_seg, bias_fn=bias_fn,
      mask=mask, chunk=cfg.attention_chunk, length_scale_base=length_scale_base,
      backend=cfg.attention_backend, context_parallel=cfg.context_parallel)
