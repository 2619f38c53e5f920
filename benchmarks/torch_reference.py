"""The same GPT-2-style models a, b, c trained in PyTorch on the CPU: the reference for train_throughput.py.

    pip install torch numpy          # not an lcr requirement; e.g. in a separate virtualenv
    python benchmarks/torch_reference.py                   # all three
    python benchmarks/torch_reference.py --configs=c --steps=20
    python benchmarks/torch_reference.py --skip_attention    # also with attention replaced by q+k+v

The models match lcr's benchmark models layer for layer: learned positions, pre-LayerNorm blocks,
causal multi-head attention (``scaled_dot_product_attention``), a GELU (tanh) MLP of width 4·d, no
biases in the linear layers, a tied embedding over a 128-symbol vocabulary, float32, and a step of
cross-entropy, backward, global-norm clipping and AdamW. Prints tokens/s and the FLOP/s counted
as in train_throughput.py (6·N + 6·L·T·D per token), one JSON object per model at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

#                (layers, d_model, heads, seq_len, batch)
MODELS = {'a': (4, 128, 4, 64, 12), 'b': (4, 256, 4, 256, 16), 'c': (6, 384, 6, 256, 16),
          # Model b at long lengths, 8192 tokens per step.
          'b2k': (4, 256, 4, 2048, 4), 'b8k': (4, 256, 4, 8192, 1)}
VOCAB = 128


def sum_of_inputs(q, k, v, is_causal):
  """Stands in for attention (as in train_throughput.py --skip_attention): q + k + v."""
  del is_causal
  return q + k + v


class Block(nn.Module):
  def __init__(self, d: int, heads: int, skip_attention: bool = False):
    super().__init__()
    self.heads = heads
    self.attend = sum_of_inputs if skip_attention else F.scaled_dot_product_attention
    self.attn_norm, self.ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
    self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
    self.wi, self.wo = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
    a = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True)
    x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
    return x + self.wo(F.gelu(self.wi(self.ffn_norm(x)), approximate='tanh'))


class LM(nn.Module):
  def __init__(self, layers: int, d: int, heads: int, seq_len: int, skip_attention: bool = False):
    super().__init__()
    self.embed = nn.Embedding(VOCAB, d)
    self.pos = nn.Parameter(torch.randn(seq_len, d) * 2 ** -0.5)
    self.blocks = nn.ModuleList(Block(d, heads, skip_attention) for _ in range(layers))
    self.norm = nn.LayerNorm(d)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    x = self.embed(tokens) * math.sqrt(self.embed.embedding_dim) + self.pos[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.norm(x) @ self.embed.weight.T


def throughput(name: str, steps: int, repeats: int, skip_attention: bool = False,
               batch_size: int = 0) -> tuple[float, int]:
  layers, d, heads, t, b = MODELS[name]
  b = batch_size or b
  torch.manual_seed(0)
  model = LM(layers, d, heads, t, skip_attention)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  tokens = torch.randint(0, VOCAB, (b, t + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  for _ in range(3):
    train_step()
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      train_step()
    best = max(best, steps * b * t / (time.perf_counter() - start))
  return best, sum(p.numel() for p in model.parameters())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='a,b,c', help='which of MODELS to run (a, b, c; b2k, b8k)')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per run')
  parser.add_argument('--skip_attention', action='store_true',
                      help='also time the step with attention replaced by q + k + v')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per config; the best is kept')
  parser.add_argument('--batch_size', type=int, default=0, help="rows per step (0: the model's)")
  args = parser.parse_args()
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
  print(f'{"cfg":<4}{"attn":>8}{"params":>11}{"tokens/s":>10}{"GFLOP/s":>9}')
  rows = []
  for name in args.configs.split(','):
    for skip in (False, True) if args.skip_attention else (False,):
      tps, n = throughput(name, args.steps, args.repeats, skip, args.batch_size)
      layers, d, _, t, _ = MODELS[name]
      flops = (6.0 * n + 6.0 * layers * t * d) * tps
      attention = 'skipped' if skip else 'sdpa'
      rows.append(dict(config=name, framework='torch', attention=attention, params=n,
                       tokens_per_s=tps, flops_per_s=flops))
      print(f'{name:<4}{attention:>8}{n:>11,}{tps:>10,.0f}{flops / 1e9:>9.1f}', flush=True)
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  main()
