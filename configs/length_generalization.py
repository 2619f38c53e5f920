"""Seq2seq length generalisation: the classic training tips, trained on lengths ≤ N, tested to 8N.

  python experiments/length_generalization.py --config=configs/length_generalization.py:quick --workdir=runs/lengths
  python experiments/length_generalization.py --config=configs/length_generalization.py:large --workdir=/data/lengths
  python experiments/sweep.py --config=configs/length_generalization.py:large --workdir=/data/sweep --dry_run

Presets (the argument after the colon):
  quick  the monotonic rewriting task, N = 8, tested at 8/16/32/64: one small encoder-decoder per
         tip (teacher forcing, three scheduled samplings, pointer-generator + coverage, guided,
         monotonic attention decoded hard and — the same training — with expected alignments,
         location-aware attention, self-critical RL) and decoder-only models with
         five encodings; two worker processes (908 s on a 2-core CPU shared with
         other training before monotonic_expected, about 100 s of training, was added;
         docs/seq2seq.md).
  large  the same variants on every task (copy, reverse, sort, addition, rewrite) with a bigger
         model and longer training, for an accelerator (``get_sweep('large')`` runs one task each).
  smoke  two variants, a few steps: the end-to-end test.

``study.variants`` names the runs and ``study.overrides[name]`` their changes to the shared config;
``--config.study.variants=teacher_forcing,monotonic`` runs a subset. Every other section is the run
config every variant shares (``seq2seq`` holds the task and the tips, see docs/seq2seq.md).
"""

from __future__ import annotations

import ml_collections

from configs import base

EXPERIMENT = 'experiments/length_generalization.py'   # what experiments/sweep.py runs

# Variant name → overrides. Tips run on the encoder-decoder; 'decoder-*' are decoder-only models
# with one positional encoding each (Kazemnejad et al. 2023's comparison).
TIPS = {
    'teacher_forcing': {'seq2seq': {'eval_decodes': ('greedy', 'beam', 'sample')}},
    'scheduled_sampling': {'seq2seq': {'training': 'scheduled_sampling', 'ss_decay': 'inverse_sigmoid',
                                       'ss_mix': 'sample'}},
    'ss_two_pass': {'seq2seq': {'training': 'two_pass', 'ss_decay': 'linear', 'ss_mix': 'softmax'}},
    'ss_parallel': {'seq2seq': {'training': 'parallel', 'ss_decay': 'exponential', 'ss_passes': 3,
                                'ss_mix': 'sample'}},
    'pointer': {'seq2seq': {'pointer': True, 'coverage_weight': 1.0}},
    'guided': {'seq2seq': {'guided_weight': 1.0}},
    'monotonic': {'seq2seq': {'cross_attention': 'monotonic'}},
    'monotonic_expected': {'seq2seq': {'cross_attention': 'monotonic', 'monotonic_decode': 'expected'}},
    'location': {'seq2seq': {'cross_attention': 'location'}},
    'rl': {'seq2seq': {'rl': {'init': 'teacher_forcing'}}},
}
ENCODINGS = {f'decoder-{name}': {'model': {'arch': 'decoder', 'pos': pos}}
             for name, pos in (('nope', 'none'), ('sinusoidal', 'sinusoidal'), ('rope', 'rope'),
                               ('alibi', 'alibi'), ('t5', 't5'))}
VARIANTS = {**TIPS, **ENCODINGS}


def _decay(decay: str, steps: int) -> dict:
  """Parameters that take ε from 1 to about 0.5 over ``steps`` (Bengio et al. 2015 §2.4):
  linear 1 − i/(2·steps) floored at 0.5, exponential (0.5^(1/steps))^i, inverse sigmoid with
  k = steps/6 (k/(k + e^6) ≈ 0.3 at the end, 0.5 near 0.8·steps)."""
  return {'linear': dict(ss_k=1.0, ss_c=0.5 / steps, ss_min=0.5),
          'exponential': dict(ss_k=0.5 ** (1.0 / steps)),
          'inverse_sigmoid': dict(ss_k=steps / 6.0)}[decay]


def _study(variants: dict, steps: int, rl_steps: int, parallel: int) -> ml_collections.ConfigDict:
  """The study section: scheduled-sampling decays fitted to ``steps``, RL run for ``rl_steps``."""
  overrides = {}
  for name, o in variants.items():
    o = {section: dict(fields) for section, fields in o.items()}
    s = o.get('seq2seq', {})
    if 'ss_decay' in s:
      s.update(_decay(s['ss_decay'], steps))
    if 'rl' in s:
      s['rl'] = {**s['rl'], 'steps': rl_steps}
    overrides[name] = o
  return ml_collections.ConfigDict(dict(variants=','.join(variants), overrides=overrides,
                                        parallel=parallel))


def _base() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.update(arch='encoder_decoder', num_layers=2, d_model=64, num_heads=4, ffn_dim=256,
                      pos='rope', attention_backend='xla', t5_max_distance=64)
  config.train.update(steps=500, batch_size=32, seq_len=64, lr=3e-3, warmup_steps=50, log_every=50,
                      eval_every=0, checkpoint_every=250, keep_checkpoints=1, tensorboard=False)
  config.seq2seq.task.update(name='rewrite', symbols=10, min_len=1, train_len=8,
                             test_multipliers=(1, 2, 4, 8), test_examples=100, pack=2)
  config.seq2seq.rl.update(lr=1e-4, batch_size=32)
  config.seq2seq.update(eval_batch=100)
  config.decode.update(num_beams=4, length_penalty=0.6, temperature=1.0)
  config.study = _study(VARIANTS, config.train.steps, 100, parallel=2)
  return config


def quick() -> ml_collections.ConfigDict:
  return _base()


def large() -> ml_collections.ConfigDict:
  """For one accelerator: a 4+4-layer model, 20k steps, 1,000 test examples per length."""
  config = _base()
  config.model.update(num_layers=4, d_model=256, num_heads=8, ffn_dim=1024, attention_backend='auto')
  config.train.update(steps=20_000, batch_size=128, lr=5e-4, warmup_steps=1000, log_every=500,
                      checkpoint_every=2000)
  config.seq2seq.task.update(train_len=16, test_examples=1000, symbols=20)
  config.seq2seq.rl.update(batch_size=128, mixer=True, mixer_delta=2, mixer_every=200)
  config.seq2seq.update(eval_batch=500)
  config.study = _study(VARIANTS, config.train.steps, 2000, parallel=1)
  return config


def smoke() -> ml_collections.ConfigDict:
  config = _base()
  config.model.update(num_layers=1, d_model=32, num_heads=2, ffn_dim=64)
  config.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=2)
  config.seq2seq.task.update(train_len=3, test_multipliers=(1, 2), test_examples=6)
  config.seq2seq.rl.update(batch_size=8)
  config.seq2seq.update(eval_batch=6)
  config.study = _study({k: VARIANTS[k] for k in ('teacher_forcing', 'rl', 'decoder-t5')}, 4, 2, 1)
  config.study.overrides.teacher_forcing.seq2seq.eval_decodes = ('greedy',)
  return config


PRESETS = {'quick': quick, 'large': large, 'smoke': smoke}
TASKS = ('copy', 'reverse', 'sort', 'addition', 'rewrite')


def get_config(arg: str = 'quick') -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f'unknown preset {arg!r}; presets: {", ".join(PRESETS)}')
  return PRESETS[arg]()


def get_sweep(arg: str = 'large') -> list[dict]:
  """One study per task and seed (dotted overrides of ``get_config(arg)``)."""
  tasks = TASKS if arg == 'large' else ('rewrite',)
  return [{'seq2seq.task.name': task, 'seed': seed} for task in tasks for seed in (0, 1)]
