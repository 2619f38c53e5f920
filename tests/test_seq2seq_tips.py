"""The training tips against their papers' formulas, recomputed in NumPy or derived by hand.

Scheduled-sampling decays (Bengio et al. 2015 §2.4), the pointer-generator mixture (See et al.
2017 eq. 8–9) and coverage loss (eq. 12), guided-attention weights (Tachibana et al. 2017 §4.1),
monotonic attention's parallel form against its recurrence, hard decoding against Algorithm 1, and
the two equal where every p is 0 or 1 (Raffel et al. 2017), location features against a NumPy
convolution (Chorowski et al. 2015), the self-critical gradient (Rennie et al. 2017 eq. 7), and
sacrebleu BLEU on pairs scored by hand.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr.seq2seq import alignment, bleu, rl, tips
from lcr.seq2seq.arch import Scores
from lcr.seq2seq.config import RLConfig, Seq2SeqConfig
from lcr.seq2seq.model import PointerGenerator, pointer_mixture


@pytest.mark.parametrize('decay,k,c,floor', [('linear', 1.0, 1e-3, 0.25), ('linear', 1.5, 2e-3, 0.0),
                                             ('exponential', 0.997, 0.0, 0.0),
                                             ('inverse_sigmoid', 120.0, 0.0, 0.0)])
def test_gold_probability_follows_bengio_et_al(decay, k, c, floor):
  cfg = Seq2SeqConfig(ss_decay=decay, ss_k=k, ss_c=c, ss_min=floor)
  for i in (0, 1, 7, 100, 500, 1000, 5000):
    want = {'linear': lambda: min(1.0, max(floor, k - c * i)), 'exponential': lambda: k ** i,
            'inverse_sigmoid': lambda: k / (k + math.exp(i / k))}[decay]()
    np.testing.assert_allclose(float(tips.gold_probability(cfg, i)), want, rtol=1e-4, atol=1e-7)


def test_pointer_mixture_by_hand():
  """V = 5, source [2, 3, 2]: token 2 appears twice and collects both attention weights."""
  vocab = np.array([[[0.1, 0.2, 0.3, 0.1, 0.3]]])
  attention = np.array([[[0.5, 0.2, 0.3]]])
  got = np.asarray(pointer_mixture(vocab, attention, np.array([[0.25]]), np.array([[2, 3, 2]])))
  # 0.25 · P_vocab + 0.75 · copy, copy(2) = 0.5 + 0.3, copy(3) = 0.2.
  np.testing.assert_allclose(got[0, 0], [0.025, 0.05, 0.675, 0.175, 0.075], atol=1e-7)
  np.testing.assert_allclose(got.sum(), 1.0, atol=1e-7)
  # An alignment that attends only 0.6 in all (monotonic): the 0.4 left goes to P_vocab.
  partial = np.asarray(pointer_mixture(vocab, attention * 0.6, np.array([[0.25]]), np.array([[2, 3, 2]])))
  want = 0.25 * vocab[0, 0] + 0.75 * (0.6 * np.array([0, 0, 0.8, 0.2, 0]) + 0.4 * vocab[0, 0])
  np.testing.assert_allclose(partial[0, 0], want, atol=1e-7)
  np.testing.assert_allclose(partial.sum(), 1.0, atol=1e-7)


def test_p_gen_is_see_et_al_eq_8():
  from lcr.config import ModelConfig
  cfg = ModelConfig(d_model=8, num_heads=2)
  rng = np.random.default_rng(0)
  h, s, x = (rng.normal(size=(2, 3, 8)).astype(np.float32) for _ in range(3))
  module = PointerGenerator(cfg)
  params = module.init(jax.random.key(0), h, s, x)['params']
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  got = np.asarray(module.apply({'params': params}, h, s, x))
  p = {k: np.asarray(v) for k, v in params.items()}
  want = 1 / (1 + np.exp(-(h @ p['w_h'] + s @ p['w_s'] + x @ p['w_x'] + p['b'])))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_guided_attention_weights_against_numpy():
  n_len, t_len, g = 7, 5, 0.2
  n = jnp.arange(n_len)[None, :]
  t = jnp.arange(t_len)[:, None]
  got = np.asarray(alignment.guided_attention_weights(n, t, n_len, t_len, g))
  want = np.array([[1 - math.exp(-((nn / n_len - tt / t_len) ** 2) / (2 * g * g)) for nn in range(n_len)]
                   for tt in range(t_len)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[0, 0] == 0 and got[-1, 0] > 0.9     # no penalty on the diagonal, near 1 far from it


def test_guided_attention_loss_on_a_packed_row():
  """Two examples in one row (sources of 3 and 2, 4 and 2 decoder steps), random maps: per step
  the mean over the example's n of A·W, summed over steps, averaged over layers and heads."""
  src_seg = np.array([[1, 1, 1, 2, 2, 0]])
  tgt_seg = np.array([[1, 1, 1, 1, 2, 2, 0]])
  pos = lambda seg: np.array([[np.sum(seg[0, :i] == s) if s else 0 for i, s in enumerate(seg[0])]])
  batch = {'source_segment_ids': src_seg, 'source_positions': pos(src_seg),
           'target_in_segment_ids': tgt_seg, 'target_in_positions': pos(tgt_seg),
           'target_out_segment_ids': tgt_seg}
  rng = np.random.default_rng(1)
  maps = [rng.uniform(size=(1, 2, 7, 6)).astype(np.float32) for _ in range(2)]
  got = float(tips.guided_attention_loss([jnp.asarray(m) for m in maps], batch, 0.3))
  want = 0.0
  for t in range(7):
    if not tgt_seg[0, t]:
      continue
    ns = [j for j in range(6) if src_seg[0, j] == tgt_seg[0, t]]
    big_n, big_t = len(ns), int(np.sum(tgt_seg[0] == tgt_seg[0, t]))
    tt = batch['target_in_positions'][0, t]
    for layer in maps:
      for h in range(2):
        want += np.mean([layer[0, h, t, j] * (1 - math.exp(-((k / big_n - tt / big_t) ** 2) / (2 * 0.09)))
                         for k, j in enumerate(ns)]) / 4
  np.testing.assert_allclose(got, want, rtol=1e-5)


def recursive_monotonic(p, alpha_prev):
  """Raffel et al. 2017 eq. 9, element by element: q_j = (1 − p_{j−1}) q_{j−1} + α_{i−1,j}."""
  alpha, q = np.zeros_like(p), 0.0
  for j in range(len(p)):
    q = (1 - p[j - 1]) * q + alpha_prev[j] if j else alpha_prev[0]
    alpha[j] = p[j] * q
  return alpha


def test_monotonic_parallel_form_equals_the_recursion():
  rng = np.random.default_rng(2)
  steps, s = 6, 9
  energy = rng.normal(scale=2.0, size=(steps, 2, s)).astype(np.float32)
  visible = np.ones(s, bool)
  visible[:2] = False                       # another example's source in a packed row
  log_alpha = jnp.asarray(np.where(np.arange(s) == 2, 0.0, alignment.NEG)[None].repeat(2, 0), jnp.float32)
  alpha_ref = np.where(np.arange(s) == 2, 1.0, 0.0)[None].repeat(2, 0)
  for i in range(steps):
    log_alpha = alignment.monotonic_expected_step(log_alpha, jnp.asarray(energy[i]), jnp.asarray(visible[None]))
    p = np.where(visible, 1 / (1 + np.exp(-energy[i].astype(np.float64))), 0.0)
    alpha_ref = np.stack([recursive_monotonic(p[h], alpha_ref[h]) for h in range(2)])
    np.testing.assert_allclose(np.exp(np.asarray(log_alpha)), alpha_ref, atol=1e-6)
    assert np.all(alpha_ref.sum(-1) <= 1 + 1e-9)


def test_hard_monotonic_attention_is_algorithm_1_and_never_moves_backwards():
  rng = np.random.default_rng(3)
  steps, s = 12, 10
  energy = rng.normal(size=(steps, 4, s)).astype(np.float32) - 0.3
  visible = jnp.ones((1, s), bool)
  alpha = jnp.asarray(np.eye(s)[[0] * 4], jnp.float32)
  index = [0] * 4
  for i in range(steps):
    alpha = alignment.monotonic_hard_step(alpha, jnp.asarray(energy[i]), visible)
    got = np.asarray(alpha)
    for h in range(4):
      if index[h] is None:
        want = None
      else:
        hits = [j for j in range(index[h], s) if energy[i, h, j] > 0]
        want = hits[0] if hits else None
      assert got[h].sum() == (0 if want is None else 1)
      if want is not None:
        assert got[h, want] == 1 and want >= index[h]
      index[h] = want


def test_hard_monotonic_attention_is_the_expected_alignment_when_p_is_saturated():
  """With every p_ij at 0 or 1 (|e| large) the expected alignment of training (eq. 9) is the hard
  one of decoding, step after step, in a packed row too: the two modes describe one process."""
  rng = np.random.default_rng(5)
  steps, heads, s = 10, 3, 9
  energy = (np.where(rng.uniform(size=(steps, heads, s)) < 0.3, 1.0, -1.0)
            * rng.uniform(15.0, 30.0, size=(steps, heads, s))).astype(np.float32)
  visible = jnp.asarray((np.arange(s) >= 2)[None])         # positions 0-1: another example's
  first = np.where(np.arange(s) == 2, 1.0, 0.0)[None].repeat(heads, 0)
  hard, log_alpha = jnp.asarray(first, jnp.float32), jnp.asarray(np.log(first + 1e-30).clip(alignment.NEG))
  attended = 0
  for i in range(steps):
    hard = alignment.monotonic_hard_step(hard, jnp.asarray(energy[i]), visible)
    log_alpha = alignment.monotonic_expected_step(log_alpha, jnp.asarray(energy[i]), visible)
    np.testing.assert_allclose(np.exp(np.asarray(log_alpha)), np.asarray(hard), atol=1e-5)
    attended += int(np.asarray(hard).sum())
  assert 0 < attended < steps * heads                      # both attending and running off the end


def test_location_features_against_numpy_convolution():
  rng = np.random.default_rng(4)
  b, h, k, w, s = 2, 3, 4, 5, 11
  alpha = rng.uniform(size=(b, h, s)).astype(np.float32)
  kernel = rng.normal(size=(h, k, w)).astype(np.float32)
  got = np.asarray(alignment.location_features(jnp.asarray(alpha), jnp.asarray(kernel)))
  padded = np.pad(alpha, ((0, 0), (0, 0), (w // 2, w // 2)))
  want = np.zeros((b, h, k, s))
  for j in range(s):
    want[:, :, :, j] = np.einsum('hkr,bhr->bhk', kernel, padded[:, :, j:j + w])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_coverage_loss_against_numpy():
  rng = np.random.default_rng(5)
  maps = [rng.dirichlet(np.ones(4), size=(1, 2, 5)).astype(np.float32)]   # [B, H, T, S]
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  got = float(tips.coverage_loss([jnp.asarray(maps[0])], jnp.asarray(mask)))
  a = maps[0].mean(1)[0]
  want = sum(np.minimum(a[t], a[:t].sum(0)).sum() for t in range(4))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('r_sample,r_greedy', [(0.8, 0.3), (0.2, 0.7), (0.5, 0.5)])
def test_self_critical_gradient_sign(r_sample, r_greedy):
  """One step, a softmax policy over 4 tokens: the loss gradient is −(r(w^s) − r(ŵ))(e_s − π), so
  a descent step raises the sample's probability exactly when it beat the greedy decode."""
  theta = jnp.array([0.3, -0.2, 0.1, 0.5])
  sample = 2

  def loss(theta):
    log_probs = jax.nn.log_softmax(theta)[None, None]
    scores = Scores(log_probs, jnp.array([[sample]]), jnp.ones((1, 1)),
                    jnp.array([[r_sample - r_greedy]]))
    return tips.reinforce_loss(scores, 1)
  grad = np.asarray(jax.grad(loss)(theta))
  pi = np.asarray(jax.nn.softmax(theta))
  np.testing.assert_allclose(grad, -(r_sample - r_greedy) * (np.eye(4)[sample] - pi), atol=1e-6)
  after = jax.nn.softmax(theta - 0.1 * grad)[sample]
  assert np.sign(float(after - pi[sample])) == np.sign(r_sample - r_greedy)


def test_mixer_schedule():
  cfg = RLConfig(steps=10, init='x', mixer=True, mixer_delta=2, mixer_every=5)
  lengths = np.array([3, 6])                   # targets; outputs add EOS: 4 and 7 tokens
  np.testing.assert_array_equal(rl.prefix_lengths(cfg, lengths, 0), [2, 5])   # Δ = 2
  np.testing.assert_array_equal(rl.prefix_lengths(cfg, lengths, 5), [0, 3])   # Δ = 4
  np.testing.assert_array_equal(rl.prefix_lengths(RLConfig(), lengths, 0), [0, 0])


def test_bleu_on_pairs_with_known_scores():
  # Every n-gram matches, the hypothesis is one symbol short: BP = exp(1 − 5/4).
  np.testing.assert_allclose(bleu.corpus_bleu([list('abcd')], [list('abcde')]), 100 * math.exp(-0.25),
                             rtol=1e-6)
  # p1..p3 = 3/4, 2/3, 1/2; no 4-gram matches, 'exp' smoothing counts it as 1 / (2 · 1).
  np.testing.assert_allclose(bleu.corpus_bleu([list('abcx')], [list('abcd')]),
                             100 * (0.75 * 2 / 3 * 0.5 * 0.5) ** 0.25, rtol=1e-6)
  assert bleu.corpus_bleu([list('abcd')], [list('abcd')]) == pytest.approx(100.0)
  # Sentence BLEU with effective order: 2-symbol hypothesis, bigrams only; BP = exp(1 − 3/2).
  np.testing.assert_allclose(bleu.sentence_bleu(list('ab'), list('abc')), 100 * math.exp(-0.5), rtol=1e-6)
  assert bleu.sentence_bleu([], list('abc')) == 0.0
  sig = bleu.signatures()
  assert 'tok:13a' in sig['corpus'] and 'eff:no' in sig['corpus'] and 'eff:yes' in sig['sentence']
