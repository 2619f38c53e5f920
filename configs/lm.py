"""Language-model presets: smoke (seconds), cpu (~10 min on 2 cores), gpu, tpu (~125M parameters),
long (8192 tokens, the sequence sharded over every device).

    python run.py --config=configs/lm.py:smoke --workdir=/tmp/lcr_smoke
    python run.py --config=configs/lm.py:cpu --workdir=runs/cpu --config.model.pos=alibi
    python run.py --config=configs/lm.py:gpu --workdir=runs/gpu
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python run.py --config=configs/lm.py:long --workdir=runs/long   # 8 simulated CPU devices

The ``tpu`` preset trains a GPT-2-small-sized model (12 layers, d_model 768, 12 heads, ~125M
parameters with a 32k BPE vocabulary) at 1024 tokens on PG-19. Prepare the corpus once (on one
host, into storage every host sees; see README), then on a TPU VM, single host (e.g. v4-8 or v5e-8):

    gcloud compute tpus tpu-vm ssh lcr-tpu --zone=us-central2-b --command="cd lcr && \
      python run.py --config=configs/lm.py:tpu --workdir=/mnt/shared/runs/tpu125m \
      --config.data.data_dir=/mnt/shared/lcr_data"

and on a pod slice (e.g. v4-32: the same command on every host; jax.distributed finds its peers):

    gcloud compute tpus tpu-vm ssh lcr-pod --zone=us-central2-b --worker=all --command="cd lcr && \
      python run.py --config=configs/lm.py:tpu --workdir=/mnt/shared/runs/tpu125m \
      --config.data.data_dir=/mnt/shared/lcr_data --config.train.batch_size=512"
"""

import ml_collections

from configs import base

PRESETS = ('smoke', 'cpu', 'gpu', 'tpu', 'long')


def _smoke(c: ml_collections.ConfigDict) -> None:
  """Seconds on one CPU core: what the end-to-end tests run."""
  c.model.update(num_layers=2, d_model=32, num_heads=2, pos='rope')
  c.train.update(steps=8, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, log_every=2,
                 eval_every=4, eval_batches=2, checkpoint_every=4, keep_checkpoints=2)
  c.eval.update(lengths=(32, 64), rope_scalings=('none',), max_tokens=2048, batch_size=4)


def _cpu(c: ml_collections.ConfigDict) -> None:
  """About ten minutes on 2 cores: a byte-level model that reaches a validation loss near 1.05."""
  c.model.update(num_layers=4, d_model=128, num_heads=4, pos='rope')
  c.train.update(steps=1500, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=100,
                 log_every=50, eval_every=250, eval_batches=8, checkpoint_every=250)
  c.eval.update(multipliers=(1, 2, 4, 8), rope_scalings=('none', 'ntk', 'yarn'), max_tokens=16384)


def _gpu(c: ml_collections.ConfigDict) -> None:
  """One GPU, tens of minutes: 6 layers at 512 tokens, BPE on the bible corpus, bfloat16."""
  c.model.update(num_layers=6, d_model=384, num_heads=6, pos='rope', dtype='bfloat16')
  c.data.update(tokenizer='bpe', vocab_size=8192)
  c.train.update(steps=5000, batch_size=64, seq_len=512, lr=1e-3, warmup_steps=200,
                 log_every=50, eval_every=500, eval_batches=16, checkpoint_every=1000)


def _tpu(c: ml_collections.ConfigDict) -> None:
  """GPT-2 small at 1024 tokens on PG-19 (~125M params); data parallel over every chip."""
  c.model.update(num_layers=12, d_model=768, num_heads=12, pos='rope', dtype='bfloat16',
                 scan_layers=True, remat=True)
  c.data.update(corpus='tfds:pg19', text_key='book_text', tokenizer='bpe', vocab_size=32768,
                read_threads=4)
  c.train.update(steps=20000, batch_size=256, seq_len=1024, lr=6e-4, warmup_steps=1000,
                 log_every=100, eval_every=1000, eval_batches=16, checkpoint_every=1000)
  c.mesh.shape = (-1, 1, 1)


def _long(c: ml_collections.ConfigDict) -> None:
  """8192-token rows, the sequence sharded over every device with ring attention
  (docs/context_parallelism.md); on one device the same run without sharding."""
  c.model.update(num_layers=2, d_model=128, num_heads=4, pos='rope', context_parallel='ring')
  c.train.update(steps=300, batch_size=2, seq_len=8192, lr=2e-3, warmup_steps=30, log_every=10,
                 eval_every=100, eval_batches=2, checkpoint_every=100)
  c.eval.update(lengths=(8192, 16384), rope_scalings=('none',), max_tokens=32768, batch_size=1)
  c.mesh.update(axes=('data', 'sequence'), shape=(1, -1))


def get_config(preset: str = 'smoke') -> ml_collections.ConfigDict:
  """``preset`` is one of PRESETS (``--config=configs/lm.py:<preset>``)."""
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; presets of configs/lm.py are {", ".join(PRESETS)}')
  c = base.get_config()
  globals()[f'_{preset}'](c)
  return c
