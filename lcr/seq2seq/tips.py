"""Training tips: scheduled-sampling decays, the exposure-bias regimes, and the auxiliary losses.

Regimes (``seq2seq.training``), each ``(arch, params, batch, step, rng) → Scores``:
  * teacher_forcing     the decoder reads the gold prefix (the baseline).
  * scheduled_sampling  Bengio et al. 2015: the decoder runs step by step (with the KV cache); at
                        step t it reads the gold token with probability ε_i, else the model's own
                        token from step t − 1 (argmax or a sample). One example per row.
  * two_pass            Mihaylova & Martins 2019: a first pass on gold inputs; the second pass
                        reads, per position, the gold token with probability ε_i, else the first
                        pass's prediction — its argmax, a sample, or the softmax-weighted
                        embedding. The gradient flows through the second pass only.
  * parallel            Duckworth et al. 2019: ``ss_passes`` passes, each mixing gold tokens with
                        the previous pass's predictions; the gradient flows through the last only.
ε_i, the probability of the gold token at training step i (Bengio et al. 2015 §2.4):
  linear ε = max(ε_min, k − c·i) (≤ 1), exponential ε = k^i (k < 1), inverse sigmoid
  ε = k / (k + exp(i / k)) (k ≥ 1).
Auxiliary losses: guided attention (Tachibana et al. 2017) and coverage (See et al. 2017 eq. 12).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lcr.config import DecodeConfig
from lcr.losses import token_nll
from lcr.seq2seq import alignment
from lcr.seq2seq.arch import Scores

DECAYS: dict[str, Callable] = {
    'linear': lambda s, i: jnp.clip(s.ss_k - s.ss_c * i, s.ss_min, 1.0),
    'exponential': lambda s, i: s.ss_k ** i,
    'inverse_sigmoid': lambda s, i: s.ss_k / (s.ss_k + jnp.exp(i / s.ss_k)),
}


def gold_probability(tips, step) -> jax.Array:
  """ε_i: the probability of feeding the gold token at training step ``step``."""
  return DECAYS[tips.ss_decay](tips, jnp.asarray(step, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Exposure-bias regimes.


def teacher_forcing(arch, params, batch, step, rng) -> Scores:
  del step
  return arch.forward(params, batch, rng=rng, mode='train')


def model_inputs(log_probs_BxTxV, mix: str, rng) -> jax.Array:
  """The model's prediction as a decoder input distribution [B, T, V] (no gradient)."""
  log_probs = jax.lax.stop_gradient(log_probs_BxTxV)
  vocab = log_probs.shape[-1]
  if mix == 'softmax':
    return jnp.exp(log_probs)
  tokens = (jnp.argmax(log_probs, -1) if mix == 'argmax'
            else jax.random.categorical(rng, log_probs, axis=-1))
  return jax.nn.one_hot(tokens, vocab, dtype=jnp.float32)


def mixed_inputs(batch, log_probs_BxTxV, gold_probability_, mix: str, rng) -> jax.Array:
  """Per position: the gold input with probability ε, else the model's prediction of it.

  The prediction at output position t is the input at position t + 1; each example's first input
  (BOS, position 0) stays gold.
  """
  vocab = log_probs_BxTxV.shape[-1]
  model = model_inputs(log_probs_BxTxV, mix, jax.random.fold_in(rng, 0))
  shifted = jnp.concatenate([jnp.zeros_like(model[:, :1]), model[:, :-1]], axis=1)
  gold = jax.nn.one_hot(batch['target_in'], vocab, dtype=jnp.float32)
  coin = jax.random.uniform(jax.random.fold_in(rng, 1), batch['target_in'].shape)
  use_gold = (coin < gold_probability_) | (batch['target_in_positions'] == 0)
  return jnp.where(use_gold[..., None], gold, shifted)


def multi_pass(arch, params, batch, step, rng, passes: int) -> Scores:
  """Passes 1 … n − 1 see the parameters as constants; pass n carries the gradient."""
  eps = gold_probability(arch.tips, step)
  frozen = jax.lax.stop_gradient(params)
  scores = arch.forward(frozen, batch, rng=jax.random.fold_in(rng, 0), mode='train')
  for k in range(1, passes):
    inputs = mixed_inputs(batch, scores.log_probs, eps, arch.tips.ss_mix, jax.random.fold_in(rng, 2 * k))
    scores = arch.forward(params if k == passes - 1 else frozen, batch,
                          rng=jax.random.fold_in(rng, 2 * k + 1), mode='train', inputs=inputs)
  return scores


def scheduled_sampling(arch, params, batch, step, rng) -> Scores:
  """Bengio et al. 2015: step by step, each input gold with probability ε_i, else the model's."""
  tips = arch.tips
  eps = gold_probability(tips, step)
  gold = batch['target_in']
  b, t = gold.shape
  stepper = arch.stepper(DecodeConfig(max_new_tokens=t), 1, mode='train', deterministic=rng is None)
  lengths = jnp.sum(batch['source_segment_ids'] > 0, axis=1).astype(jnp.int32)
  carry = (params, batch['source'], lengths, rng)
  log_probs, state = stepper.prefill(carry, gold[:, :1], jnp.ones((b,), jnp.int32))
  coins = jax.random.uniform(jax.random.fold_in(rng, 7), (b, t)) < eps

  def body(loop, i):
    state, previous = loop
    own = jnp.argmax(previous, -1) if tips.ss_mix == 'argmax' else jax.random.categorical(
        jax.random.fold_in(rng, 1000 + i), previous, axis=-1)
    token = jnp.where(coins[:, i], gold[:, i], jax.lax.stop_gradient(own).astype(jnp.int32))
    out, state = stepper.step(carry, state, token, jnp.full((b,), i, jnp.int32))
    return (state, out), out

  _, rest = jax.lax.scan(body, (state, log_probs), jnp.arange(1, t))
  all_log_probs = jnp.concatenate([log_probs[:, None], rest.swapaxes(0, 1)], axis=1)
  mask = (batch['target_out_segment_ids'] > 0).astype(jnp.float32)
  return Scores(all_log_probs, batch['target_out'], mask, batch['weights'] * mask)


REGIMES: dict[str, Callable] = {
    'teacher_forcing': teacher_forcing,
    'scheduled_sampling': scheduled_sampling,
    'two_pass': lambda arch, params, batch, step, rng: multi_pass(arch, params, batch, step, rng, 2),
    'parallel': lambda arch, params, batch, step, rng: multi_pass(
        arch, params, batch, step, rng, arch.tips.ss_passes),
}
# Regimes that decode step by step need one example per row.
UNPACKED = ('scheduled_sampling',)


# ----------------------------------------------------------------------------------------------
# Losses.


def cross_entropy(scores: Scores) -> tuple[jax.Array, jax.Array]:
  """(Σ weighted NLL over output tokens, number of output tokens)."""
  nll = token_nll(scores.log_probs, scores.targets)
  return jnp.sum(jnp.where(scores.mask > 0, nll * scores.weights, 0.0)), jnp.sum(scores.mask)


def guided_attention_loss(maps, batch, g: float) -> jax.Array:
  """Σ over output tokens of Tachibana et al.'s mean_n A_nt W_nt, averaged over layers and heads.

  n, N: the source position and length of the token's example; t, T: its decoder step and number
  of steps. Per example this is T · E_{n,t}[A_nt W_nt], the paper's L_att times T.
  """
  t = batch['target_in_positions'][:, :, None].astype(jnp.float32)
  t_len = alignment.segment_lengths(batch['target_in_segment_ids'])[:, :, None]
  n = batch['source_positions'][:, None, :].astype(jnp.float32)
  n_len = alignment.segment_lengths(batch['source_segment_ids'])[:, None, :]
  weights = alignment.guided_attention_weights(n, t, jnp.maximum(n_len, 1), jnp.maximum(t_len, 1), g)
  per_step = sum(jnp.mean(a, axis=1) for a in maps) / len(maps)              # [B, T, S]
  own = ((batch['target_in_segment_ids'][:, :, None] == batch['source_segment_ids'][:, None, :])
         & (batch['source_segment_ids'][:, None, :] > 0))                      # the example's n
  terms = jnp.sum(jnp.where(own, per_step * weights, 0.0), axis=-1) / jnp.maximum(
      jnp.sum(own, axis=-1), 1)                                                # mean over n
  return jnp.sum(terms * (batch['target_out_segment_ids'] > 0))


def coverage_loss(maps, mask_BxT) -> jax.Array:
  """See et al. 2017 eq. 12, summed over output tokens: Σ_t Σ_i min(a_i^t, c_i^t), c^t = Σ_{t'<t} a^{t'}.

  The copy attention is the last layer's, averaged over heads. In a packed row attention never
  crosses examples, so the plain running sum over the row is each example's own coverage.
  """
  a = jnp.mean(maps[-1], axis=1)                                            # [B, T, S]
  coverage = jnp.cumsum(a, axis=1) - a
  return jnp.sum(jnp.sum(jnp.minimum(a, coverage), axis=-1) * mask_BxT)


def reinforce_loss(scores: Scores, num_sequences) -> jax.Array:
  """−(1/B) Σ_b Σ_t w_bt log p(y_bt): w = the advantage r(w^s) − r(ŵ) on sampled tokens (Rennie
  et al. 2017 eq. 7's self-critical gradient), 1 on gold tokens trained by cross-entropy (MIXER)."""
  log_p = -token_nll(scores.log_probs, scores.targets)
  return -jnp.sum(jnp.where(scores.mask > 0, scores.weights * log_p, 0.0)) / num_sequences
