"""The papers' default numbers, pinned: each asserted against the number its paper gives.

Nothing here compares a default with ``Config()`` or with another lcr default: every expected value
is written out with its source, so a default that drifts (in the dataclass, in ``configs/base.py``,
in a preset that claims a paper's setting, or in a function's keyword default) fails a test.
"""

import math

import numpy as np
import pytest

from lcr import cli, positional
from lcr.config import ModelConfig
from test_positional import reference_inv_freq

# (field of ModelConfig, the paper's value, where it comes from)
PAPER_DEFAULTS = [
    ('rope_base', 10000.0, 'RoFormer, Su et al. 2021 eq. 15: θ_i = 10000^(−2(i−1)/d)'),
    ('yarn_beta_fast', 32.0, 'YaRN, Peng et al. 2023 §3.2: "we recommend α = 1 and β = 32"'),
    ('yarn_beta_slow', 1.0, 'YaRN, Peng et al. 2023 §3.2: α = 1'),
    ('xpos_gamma', 0.4, 'xPos, Sun et al. 2022 eq. 11: ζ_i = (2i/d + γ)/(1 + γ), γ = 0.4'),
    ('xpos_scale_base', 512.0, 'xPos, Sun et al. 2022 §3.2: ζ^(n/B), B = 512 (torchscale XPOS)'),
    ('t5_num_buckets', 32, 'T5, Raffel et al. 2020 §2.1: "we use 32 embeddings"'),
    ('t5_max_distance', 128, 'T5, Raffel et al. 2020 §2.1: "up to an offset of 128"'),
    ('sink_tokens', 4, 'StreamingLLM, Xiao et al. 2023 §3.2: four initial tokens as sinks'),
    ('bigbird_random_blocks', 3, 'BigBird, Zaheer et al. 2020, BigBird-ITC: r = 3 random blocks'),
]


@pytest.mark.parametrize('field,value,source', PAPER_DEFAULTS, ids=[p[0] for p in PAPER_DEFAULTS])
def test_model_config_default_is_the_papers(field, value, source):
  assert getattr(ModelConfig(), field) == value, source


def test_base_config_file_carries_the_papers_defaults():
  """What ``configs/base.py`` gives every experiment file, read through the CLI loader."""
  model = cli.load('configs/base.py').model
  for field, value, source in PAPER_DEFAULTS:
    assert getattr(model, field) == value, f'configs/base.py model.{field}: {source}'


def test_alibi_slopes_start_at_two_to_the_minus_eight_over_n():
  """Press et al. 2022 §3: with n heads the slopes are 2^(−8/n), 2^(−16/n), …, 2^(−8); for 8
  heads 1/2, 1/4, …, 1/256, for 16 heads 1/2^0.5, 1/2^1, …, 1/2^8."""
  np.testing.assert_allclose(positional.alibi_slopes(8), [2.0 ** -k for k in range(1, 9)],
                             rtol=1e-12)
  np.testing.assert_allclose(positional.alibi_slopes(16), [2.0 ** (-k / 2) for k in range(1, 17)],
                             rtol=1e-12)


def test_function_defaults_are_the_papers():
  """Keyword defaults a caller gets by omitting them: RoPE base 10000, YaRN betas (32, 1) and
  its scale 0.1·ln(s) + 1 (Peng et al. 2023 eq. 22), xPos γ = 0.4."""
  d = 64
  np.testing.assert_allclose(positional.rope_inv_freq(d)[0], 10000.0 ** (-np.arange(0, d, 2) / d),
                             rtol=1e-12)
  got, scale = positional.rope_inv_freq(d, scaling='yarn', factor=4.0, original_length=2048)
  want, _ = reference_inv_freq(d, 10000.0, 'yarn', 4.0, 2048, 0, 32.0, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
  low, high = 8, 21   # YaRN eq. 17–18 (d 64, base 10000, L 2048): the dims for 32 and 1 turns
  ramp = positional.yarn_ramp(d, 10000.0, 2048)
  assert ramp[low] == 0 and ramp[low + 1] > 0 and ramp[high - 1] < 1 and ramp[high] == 1
  np.testing.assert_allclose(positional.xpos_zeta(8), [(2 * i / 8 + 0.4) / 1.4 for i in range(4)],
                             rtol=1e-12)


def test_paper_presets_use_the_papers_model_sizes():
  """configs/extrapolation.py:paper is the ALiBi paper's WikiText-103 model (Press et al. 2022 §4:
  16 layers, d_model 1024, 8 heads, FFN 4096, L = 512); configs/lm.py:tpu is GPT-2 small
  (Radford et al. 2019 Table 2 and §2.3: 12 layers, d_model 768, 1024 tokens of context; 12 heads
  as in GPT, Radford et al. 2018 §4.1)."""
  paper = cli.load_config_dict('configs/extrapolation.py:paper')
  assert (paper.model.num_layers, paper.model.d_model, paper.model.num_heads,
          paper.model.ffn_dim, paper.train.seq_len) == (16, 1024, 8, 4096, 512)
  gpt2 = cli.load('configs/lm.py:tpu')
  assert (gpt2.model.num_layers, gpt2.model.d_model, gpt2.model.num_heads,
          gpt2.train.seq_len) == (12, 768, 12, 1024)
