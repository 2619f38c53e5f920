"""The ``cpu_flash`` backend (a C++ kernel reached through jax.ffi) against the float64 reference.

The reference and the inputs are test_attention's (masks from the papers' definitions, NumPy
float64 forward pass, gradients of a dense float64 implementation), with head_dim 16 — the kernel
needs a multiple of 16 — unless a test says otherwise, and without the ALiBi/T5 logit biases,
which the kernel does not take.

These tests skip only on a machine without a C++ compiler (CI installs one: ``.ci/run``). Where a
compiler exists, a kernel that fails to build fails them, rather than leaving ``auto`` to fall
back to ``xla`` unnoticed.
"""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_attention as ref
from lcr import attention
from lcr.attention import MaskSpec, cpu_flash
from lcr.config import ModelConfig

needs_kernel = pytest.mark.skipif(cpu_flash.compiler() is None,
                                  reason='no C++ compiler to build the cpu_flash kernel with')


@needs_kernel
def test_the_kernel_builds_and_auto_picks_it_where_a_compiler_exists():
  assert cpu_flash.unavailable() is None
  assert attention.choose(ref.call(t=512))[0] == 'cpu_flash'


@pytest.fixture(autouse=True)
def head_dim_16(monkeypatch):
  monkeypatch.setattr(ref, 'D', 16)


@needs_kernel
@pytest.mark.parametrize('mask', list(ref.MASKS))
def test_matches_float64_reference_for_every_mask(mask):
  base = 16 if mask == 'length_scaled' else 0
  ref.check_against_reference('cpu_flash', ref.MASKS[mask], ref.POSITIONS, ref.POSITIONS,
                              ref.SEGMENTS, ref.SEGMENTS, base=base, use_bias=False)


@needs_kernel
@pytest.mark.parametrize('head_dim', [16, 32, 48, 64, 80])
def test_every_head_size_path_at_lengths_that_are_not_tile_multiples(head_dim, monkeypatch):
  """The micro-kernel runs 1, 2, 3 or 4 vectors of 16 per 64 columns: head_dim 16, 32, 48, 64, and
  80 = 64 + 16. 70 queries over 83 keys: tiles of 64 plus 6 and 19 (zero-padded copies); two
  documents in row 0; in row 1 the window of 12 skips the last query tile's first key tile."""
  monkeypatch.setattr(ref, 'D', head_dim)
  t, s = 70, 83
  qp = np.stack([np.r_[np.arange(30), np.arange(t - 30)], np.arange(s - t, s)])
  kp = np.stack([np.r_[np.arange(30), np.arange(s - 30)], np.arange(s)])
  qs = np.stack([np.r_[[1] * 30, [2] * (t - 30)], np.ones(t, int)])
  ks = np.stack([np.r_[[1] * 30, [2] * (s - 30)], np.ones(s, int)])
  ref.check_against_reference('cpu_flash', MaskSpec('sliding', window=12), qp, kp, qs, ks,
                              use_bias=False)


@needs_kernel
@pytest.mark.parametrize('mask', ['causal', 'sliding', 'longformer'])
def test_several_tiles_with_a_partial_last_one(mask):
  """150 tokens: tiles of 64, 64 and 22 queries and keys; two documents in row 0."""
  ref.check_against_reference('cpu_flash', ref.MASKS[mask], ref.LONG_POSITIONS,
                              ref.LONG_POSITIONS, ref.LONG_SEGMENTS, ref.LONG_SEGMENTS,
                              use_bias=False)


@needs_kernel
def test_exact_when_positions_do_not_follow_the_index():
  """Tiles are skipped by the mask itself, so any order of positions stays exact."""
  rng = np.random.default_rng(7)
  qp = np.stack([rng.permutation(ref.LONG), rng.permutation(ref.LONG) + 5])
  ref.check_against_reference('cpu_flash', MaskSpec(), qp, qp, None, None, use_bias=False)


@needs_kernel
@pytest.mark.parametrize('t,s', [(23, 37), (70, 130)])
def test_cross_attention(t, s):
  qp, kp = np.broadcast_to(np.arange(t), (ref.B, t)), np.broadcast_to(np.arange(s), (ref.B, s))
  qs = np.stack([np.r_[[1] * 10, [2] * (t - 10)], np.ones(t, int)])
  ks = np.stack([np.r_[[1] * 20, [2] * (s - 20)], np.ones(s, int)])
  ref.check_against_reference('cpu_flash', MaskSpec(causal=False), qp, kp, qs, ks,
                              use_bias=False)


@needs_kernel
def test_query_with_no_visible_key_averages_values_and_passes_no_gradient_to_q():
  ref.check_query_with_no_visible_key('cpu_flash', grad_atol=1e-5)


@needs_kernel
@pytest.mark.parametrize('layers', ['unrolled', 'scanned_and_rematerialised'])
def test_language_model_loss_and_gradients_match_the_xla_backend(layers):
  """An invariant: the backends are interchangeable inside the model (each is checked against
  the float64 reference on its own), with layers unrolled or scanned and rematerialised."""
  from lcr.model import TransformerLM
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 29, size=(2, 70)))
  scanned = layers != 'unrolled'
  results = []
  for backend in ('cpu_flash', 'xla'):
    model = TransformerLM(ModelConfig(vocab_size=29, num_layers=2, d_model=64, num_heads=4,
                                      num_kv_heads=2, attention_backend=backend,
                                      scan_layers=scanned, remat=scanned))
    params = model.init(jax.random.PRNGKey(0), tokens[:, :8])['params']

    def loss(params, model=model):   # next-token cross-entropy
      logp = jax.nn.log_softmax(model.apply({'params': params}, tokens)[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (l1, g1), (l2, g2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_without_a_compiler_the_backend_says_so_and_auto_uses_xla(monkeypatch):
  monkeypatch.setattr(cpu_flash, 'compiler', lambda: None)
  with pytest.raises(cpu_flash.CompileError, match='no C.. compiler'):
    cpu_flash.library_path.__wrapped__()
  monkeypatch.setattr(cpu_flash, 'unavailable', lambda: 'the C++ kernel is unavailable: no C++')
  call = ref.call(t=256)
  assert attention.choose(call)[0] == 'xla'
  with pytest.raises(ValueError, match='unavailable'):
    attention.resolve('cpu_flash', call)


ENSURE_COMPILER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.ci',
                               'ensure_compiler')


def run_ensure_compiler(path_dir):
  """.ci/ensure_compiler with nothing but ``path_dir`` on PATH (no compiler there)."""
  return subprocess.run(['/bin/bash', ENSURE_COMPILER], env={'PATH': str(path_dir)},
                        capture_output=True, text=True, check=False)


def test_ci_stops_with_a_clear_message_when_no_compiler_can_be_had(tmp_path):
  result = run_ensure_compiler(tmp_path)
  assert result.returncode == 1
  assert result.stderr.startswith('error: no C++ compiler ($CXX, g++, c++ or clang++) to build the '
                                  'cpu_flash kernel, and no apt-get to install one with')


@pytest.mark.skipif(os.geteuid() != 0, reason='the apt-get path runs as root here')
def test_ci_installs_g_plus_plus_with_apt_get_when_no_compiler_exists(tmp_path):
  """A stand-in apt-get whose ``install`` puts a g++ on PATH: the script calls it and finds it."""
  for tool in ('id', 'env'):
    os.symlink(shutil.which(tool), tmp_path / tool)
  gxx = tmp_path / 'g++'
  (tmp_path / 'apt-get').write_text(
      f'#!/bin/bash\necho "$@" >> {tmp_path}/calls\n'
      f'[ "$1" = install ] && printf "#!/bin/bash\\n" > {gxx} && /bin/chmod +x {gxx}\n'
      'exit 0\n')
  (tmp_path / 'apt-get').chmod(0o755)
  result = run_ensure_compiler(tmp_path)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'calls').read_text().splitlines() == ['update -qq', 'install -y -qq g++']
  assert result.stdout.strip() == f'C++ compiler for the cpu_flash kernel: {gxx}'
