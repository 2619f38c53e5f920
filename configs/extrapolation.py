"""The "train short, test long" study: one model per positional encoding, evaluated far past L.

  python experiments/extrapolation.py --config=configs/extrapolation.py:quick --workdir=runs/quick
  python experiments/extrapolation.py --config=configs/extrapolation.py:paper --workdir=/data/runs/paper
  python experiments/sweep.py --config=configs/extrapolation.py:quick --workdir=runs/sweep --dry_run

  python experiments/extrapolation.py --config=configs/extrapolation.py:retrieval --workdir=runs/retrieval
  python experiments/extrapolation.py --config=configs/extrapolation.py:extend --workdir=runs/extend

Presets (the argument after the colon):
  quick  the README's first command: built-in Bible text as bytes, 2 layers, d_model 128, L = 64,
         evaluated at 64 ... 2048 tokens, two worker processes; minutes on a 2-core CPU.
  retrieval  MQAR and passkey with loss on the answers only (lcr.data.tasks), six encodings at
         L = 64, recall by length (to 32L) × depth × RoPE scaling; passkey.png, recall.png.
  extend  RoPE at L = 64, then fine-tuned at 4L with PI / NTK / YaRN × full / LoRA / LoRA with
         trainable embeddings and norms (lcr.extend); extension.png and its table.
  paper  the ALiBi paper's setting (Press et al. 2022 §4: 16 layers, d_model 1024, 8 heads,
         L = 512, evaluated up to 16k) on PG-19 (tfds) with a 32k BPE vocabulary, for TPU VMs.
  smoke  two encodings, a few steps, two lengths: the end-to-end test.
  smoke_phases  the retrieval and extension phases in seconds (tests/test_extend.py).
  directions  quick's models at half its steps with recurrence and memory (Transformer-XL,
         Infini-attention) and other token mixers (linear attention, RetNet, a Mamba-style SSM)
         next to RoPE and ALiBi, with passkey retrieval; docs/memory_and_mixers.md:
         python experiments/extrapolation.py --config=configs/extrapolation.py:directions --workdir=runs/directions

Every field can be overridden, e.g. ``--config.train.steps=2000`` or
``--config.study.variants=rope,alibi``. ``study`` describes the study itself: the variants
(each a value of model.pos unless ``study.overrides[name]`` sets one) and how to run them; the
other sections are the run config every variant shares. ``get_sweep`` lists the runs of a sweep.
"""

from __future__ import annotations

import ml_collections

from configs import base

ALL_VARIANTS = 'sinusoidal,learned,none,rope,alibi,xpos,t5'


def _base() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.train.update(eval_every=0, checkpoint_every=0, keep_checkpoints=1)
  config.study = ml_collections.ConfigDict(dict(
      # Comma-separated names, e.g. --config.study.variants=rope,alibi
      variants=ALL_VARIANTS,
      # {variant or task name: {section: {field: value}}} applied on top of the shared config.
      overrides=ml_collections.ConfigDict(),
      # Worker processes, each pinned to one CPU core and single-threaded (CPU only; 1 = in-process).
      parallel=1,
      # Fraction of training rows replaced by passkey examples at L (0 = plain language modelling).
      passkey_mix=0.0,
      passkey_mix_format='compact',
      # data.task values to train every variant on, one model per (task, variant), e.g. 'mqar,passkey'
      # (synthetic retrieval tasks, lcr.data.tasks); '' = the data section's task.
      tasks='',
      # The extension phase (lcr.extend): fine-tune these trained models (study model names) at
      # factor × L under each RoPE scaling with each method; variants='' = no extension phase.
      extend=ml_collections.ConfigDict(dict(
          variants='', scalings='linear,ntk,yarn', methods='full,lora,lora_embed_norm', factor=4,
          steps=200, eval_every=0, overrides=ml_collections.ConfigDict())),
  ))
  return config


def quick() -> ml_collections.ConfigDict:
  """Six encodings and four RoPE scalings, bytes, L = 64, evaluated to 2048: ~12 min on 2 cores."""
  config = _base()
  config.data.update(corpus='bible', tokenizer='bytes')
  # YaRN's default betas (32, 1) span the wrong dims at L = 64; (4, 1) keeps its ramp in range.
  config.model.update(num_layers=2, d_model=128, num_heads=4, attention_backend='auto',
                      yarn_beta_fast=4.0, yarn_beta_slow=1.0)
  config.train.update(steps=800, batch_size=32, seq_len=64, lr=2e-3, warmup_steps=50,
                      log_every=100, tensorboard=False)
  config.eval.update(multipliers=(1, 2, 4, 8, 16, 32), protocols=('nonoverlapping',),
                     max_tokens=16384, batch_size=16, learned_positions='clamp',
                     passkey_format='compact', passkey_depths=(0.0, 0.5, 1.0), passkey_trials=8,
                     passkey_lengths=(64, 128, 256, 512))
  # NoPE is left out: with 2 layers it trains poorly. Passkey is off: models this small do not
  # learn it in 800 steps (--config.eval.passkey=true --config.study.passkey_mix=0.25 and many more
  # steps turn it on; see README).
  config.study.update(variants='sinusoidal,learned,rope,alibi,xpos,t5', parallel=2)
  return config


def retrieval() -> ml_collections.ConfigDict:
  """MQAR and passkey (loss on the answers only) for six encodings at L = 64, recall to 2048."""
  config = _base()
  # 4 pairs, every example asking 16 queries (each key at least once): with one query per key a
  # 2-layer model stays at chance for 2,000 steps; 16 answers per row, it recalls within 1,000.
  config.data.update(corpus='bible', tokenizer='bytes', mqar_pairs=4, mqar_vocab=16,
                     mqar_queries=16, passkey_format='compact')
  config.model.update(num_layers=2, d_model=64, num_heads=4, attention_backend='auto',
                      yarn_beta_fast=4.0, yarn_beta_slow=1.0)
  config.train.update(steps=2000, batch_size=32, seq_len=64, lr=3e-3, warmup_steps=50,
                      log_every=250, tensorboard=False, eval_batches=4)
  config.eval.update(multipliers=(1, 2, 4, 8, 16, 32), batch_size=16, learned_positions='clamp',
                     passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials=16)
  # Passkey is learnt within 500 steps (loss on the key < 0.01), MQAR needs more (RoPE ~750).
  config.study.update(variants='sinusoidal,learned,rope,alibi,xpos,t5', tasks='mqar,passkey',
                      parallel=2, overrides={'passkey': {'train': {'steps': 600}}})
  return config


def extend() -> ml_collections.ConfigDict:
  """RoPE trained at L = 64, then fine-tuned at 256 with PI / NTK / YaRN × full / LoRA /
  LoRA + embeddings and norms, evaluated to 1024."""
  config = quick()
  config.eval.update(multipliers=(1, 2, 4, 8, 16), rope_scalings=('none', 'linear', 'ntk', 'yarn'))
  config.study.update(variants='rope', parallel=2)
  config.study.extend.update(
      variants='rope', scalings='linear,ntk,yarn', methods='full,lora,lora_embed_norm', factor=4,
      steps=200, eval_every=50, overrides={'train': {'batch_size': 16, 'lr': 1e-3, 'warmup_steps': 20,
                                      'log_every': 50}})
  return config


def paper() -> ml_collections.ConfigDict:
  config = _base()
  config.data.update(corpus='tfds:pg19', text_key='book_text', tokenizer='bpe', vocab_size=32768)
  config.model.update(num_layers=16, d_model=1024, num_heads=8, ffn_dim=4096,
                      attention_backend='auto', dtype='bfloat16', remat=True, scan_layers=True)
  config.train.update(steps=100_000, batch_size=256, seq_len=512, lr=3e-4, warmup_steps=2000,
                      eval_every=5000, checkpoint_every=2000, keep_checkpoints=2)
  config.eval.update(multipliers=(1, 2, 4, 8, 16, 32), protocols=('nonoverlapping', 'sliding'),
                     stride=512, max_tokens=131_072, batch_size=16, passkey=True,
                     passkey_trials=20, passkey_lengths=(512, 1024, 2048, 4096, 8192))
  config.study.update(parallel=1)
  return config


def smoke() -> ml_collections.ConfigDict:
  config = quick()
  config.model.update(num_layers=1, d_model=32, num_heads=2)
  config.train.update(steps=4, batch_size=8, seq_len=48, warmup_steps=1, log_every=2)
  config.eval.update(multipliers=(1, 2), max_tokens=256, rope_scalings=('none', 'yarn'),
                     passkey=True, passkey_trials=2, passkey_depths=(0.0, 1.0), passkey_lengths=(64,),
                     passkey_modes=('teacher_forced', 'generate'))
  config.study.update(variants='rope,learned', parallel=1, passkey_mix=0.25)
  return config


def smoke_phases() -> ml_collections.ConfigDict:
  """The retrieval and extension phases in seconds: what tests/test_extend.py runs."""
  config = smoke()
  config.data.update(mqar_pairs=2, mqar_vocab=8)
  config.train.update(steps=3)
  config.eval.update(rope_scalings=('none', 'linear'), passkey=False, passkey_lengths=())
  config.study.update(variants='rope', tasks='lm,mqar', passkey_mix=0.0)
  config.study.extend.update(variants='lm-rope', scalings='linear', methods='lora', factor=2,
                             steps=2, eval_every=1)
  return config




# study.overrides of the directions preset: each a memory or mixer (lcr.mixers) on quick's model.
# Memories train on contiguous streams, carrying their state from step to step; mixers on packed
# rows like the encodings. Infini-attention reads two segments per row, so the memory it writes in
# one segment is read, with gradient, in the next (as the paper trains). MQAR examples are
# independent rows: the memories train on them shuffled, with no state carried between steps.
CONTIGUOUS = {'data': {'contiguous': True, 'shuffle': False}}
INDEPENDENT_ROWS = {'data': {'contiguous': False, 'shuffle': True}}
# MQAR at quick's width: RoPE stays at chance at lr 2e-3 (400 steps), 3e-3 (1,000 steps) and
# 5e-3; at a constant 1e-3 it recalls after ~450 (abruptly, as in the retrieval preset).
MQAR_TRAIN = {'steps': 500, 'lr': 1e-3, 'min_lr_ratio': 1.0}
DIRECTIONS = {
    'xl': {'model': {'pos': 'rope', 'memory': 'xl', 'segment_length': 64, 'memory_length': 64},
           **CONTIGUOUS},
    'infini': {'model': {'pos': 'rope', 'memory': 'infini', 'segment_length': 32,
                         'memory_update': 'delta'}, **CONTIGUOUS},
    'linear': {'model': {'pos': 'none', 'mixer': 'linear'}},
    'retention': {'model': {'pos': 'none', 'mixer': 'retention'}},
    # Inner width d_model (Mamba: 2·d_model) keeps the block at attention's parameter count.
    'ssm': {'model': {'pos': 'none', 'mixer': 'ssm', 'ssm_expand': 1}},
    'mqar': {'train': MQAR_TRAIN},
    'mqar-xl': INDEPENDENT_ROWS,
    'mqar-infini': INDEPENDENT_ROWS,
}


def directions() -> ml_collections.ConfigDict:
  """quick's model for RoPE, ALiBi, two memories and three mixers: language modelling (perplexity
  to 32L) and MQAR (recall at L, 8L and 32L), one model per (task, variant)."""
  config = quick()
  # 300 steps of 32 rows (quick: 800): fourteen models within 15 minutes on 2 cores; the SSM's
  # scan costs ~4x attention's on CPU.
  config.train.update(steps=300)
  # MQAR as in the retrieval preset (4 pairs, 16 queries per example); recall at L, 8L and 32L.
  config.data.update(mqar_pairs=4, mqar_vocab=16, mqar_queries=16)
  config.eval.update(rope_scalings=('none',), passkey=False, passkey_lengths=(64, 512, 2048),
                     passkey_depths=(0.0, 0.5, 1.0), passkey_trials=16)
  # The SSM, the slowest to train, first: the other worker trains the rest meanwhile.
  config.study.update(variants='ssm,rope,alibi,xl,infini,linear,retention', tasks='lm,mqar',
                      overrides=ml_collections.ConfigDict(DIRECTIONS))
  return config


PRESETS = {'quick': quick, 'retrieval': retrieval, 'extend': extend, 'directions': directions,
           'paper': paper, 'smoke': smoke, 'smoke_phases': smoke_phases}


def get_config(arg: str = 'quick') -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f'unknown preset {arg!r}; presets: {", ".join(PRESETS)}')
  return PRESETS[arg]()


def get_sweep(arg: str = 'quick') -> list[dict]:
  """The runs of a sweep: dotted overrides of ``get_config(arg)``, one dict per run.

  Each run trains and evaluates one positional encoding with one seed at one training length;
  ``experiments/sweep.py`` gives each its own workdir and combines their results.
  """
  config = get_config(arg)
  train_lens = {'paper': (512, 1024), 'directions': (64,)}.get(
      arg, (48,) if arg.startswith('smoke') else (64, 128))
  seeds = (0, 1)
  return [{'study.variants': variant, 'seed': seed, 'train.seq_len': length}
          for variant in config.study.variants.split(',') for seed in seeds for length in train_lens]
