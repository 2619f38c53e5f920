"""Generated tasks, their length split and the grain pipeline; config errors; the study end to end.

References: targets derived by hand; determinism and disjointness as invariants; the iterator's
saved state as the reference for resuming; a study re-run as the reference for resumption.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lcr import cli
from lcr.config import ConfigError, from_config_dict
from lcr.seq2seq import arch as arch_lib
from lcr.seq2seq import config as config_lib
from lcr.seq2seq import data, tasks
from lcr.seq2seq.config import TaskConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_targets_by_hand():
  rng = np.random.default_rng(0)
  assert tasks.REGISTRY['copy'].target(list('bca')) == list('bca')
  assert tasks.REGISTRY['reverse'].target(list('bca')) == list('acb')
  assert tasks.REGISTRY['sort'].target(list('cab')) == list('abc')
  assert tasks.REGISTRY['addition'].target(list('58+67')) == list('125')
  assert tasks.REGISTRY['addition'].target(list('9+1')) == list('10')
  # The fixed rewriting table (its first letters), and a rewrite is their concatenation in order.
  assert [tasks.REWRITE_TABLE[c] for c in 'abcd'] == ['pw', 'k', 'qu', 'z']
  assert tasks.REGISTRY['rewrite'].target(list('dab')) == list('zpwk')
  operands = tasks.REGISTRY['addition'].source(rng, 4, TaskConfig(name='addition'))
  assert len(operands) == 9 and operands[4] == '+' and operands[0] != '0' and operands[5] != '0'


@pytest.mark.parametrize('name', config_lib.TASKS)
def test_examples_are_deterministic_split_by_length_and_disjoint(name):
  cfg = TaskConfig(name=name, train_len=4, min_len=2, symbols=5, test_multipliers=(1, 2), holdout=3)
  task = tasks.REGISTRY[name]
  train = [tasks.train_example(cfg, i) for i in range(300)]
  assert train == [tasks.train_example(TaskConfig(**dataclasses.asdict(cfg)), i) for i in range(300)]
  assert train != [tasks.train_example(dataclasses.replace(cfg, seed=1), i) for i in range(300)]
  lengths = {len(s) for s, _ in train}
  assert lengths == {task.max_source(n) for n in range(2, 5)}         # every length 2 … N, no more
  for source, target in train:
    assert target == task.target(source)
  for n in cfg.test_lengths:
    test = tasks.test_set(dataclasses.replace(cfg, test_examples=20), n)
    assert test == tasks.test_set(dataclasses.replace(cfg, test_examples=20), n)
    assert {len(s) for s, _ in test} == {task.max_source(n)}
    assert all(t == task.target(s) for s, t in test)
  # At the test length inside the training range, test sources never occur in training.
  at_n = {tuple(s) for s, _ in tasks.test_set(dataclasses.replace(cfg, test_examples=30), 4)}
  assert at_n and not at_n & {tuple(s) for s, _ in train}
  assert all(tasks.is_test_only(list(s), 3) for s in at_n)


def small_config(arch='encoder_decoder', **seq2seq):
  return from_config_dict({
      'model': dict(arch=arch, vocab_size=tasks.VOCAB_SIZE, num_layers=1, d_model=16, num_heads=2),
      'seq2seq': {'task': dict(name='reverse', train_len=4, pack=3), **seq2seq}})


def test_packed_batches_resume_from_the_saved_state():
  cfg = small_config()
  the_arch = arch_lib.make(cfg)
  it = data.make_train_iterator(cfg, the_arch, 4)
  first = next(it)
  state = it.get_state()
  second = next(it)
  again = data.make_train_iterator(cfg, the_arch, 4)
  again.set_state(state)
  assert all(np.array_equal(second[k], v) for k, v in next(again).items())
  assert first['source'].shape == (4, 12) and first['target_in'].shape == (4, 15)
  seg, pos = first['target_in_segment_ids'], first['target_in_positions']
  assert seg.max() >= 2                                                  # rows do hold packs
  # Each example restarts at position 0 with BOS, its target_out is its target_in shifted by one.
  starts = (seg > 0) & (pos == 0)
  assert np.all(first['target_in'][starts] == tasks.BOS_ID)
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  assert np.array_equal(first['target_in'][:, 1:][same], first['target_out'][:, :-1][same])
  # Each example's source is the reverse of its target (without EOS).
  for b in range(4):
    for k in range(1, seg[b].max() + 1):
      src = first['source'][b][first['source_segment_ids'][b] == k]
      out = first['target_out'][b][seg[b] == k]
      assert out[-1] == tasks.EOS_ID and np.array_equal(out[:-1], src[::-1])


@pytest.mark.parametrize('overrides,message', [
    ({'seq2seq': {'task': {'name': 'transpose'}}}, 'seq2seq.task.name'),
    ({'seq2seq': {'training': 'professor_forcing'}}, 'seq2seq.training'),
    ({'seq2seq': {'cross_attention': 'gaussian'}}, 'seq2seq.cross_attention'),
    ({'seq2seq': {'ss_decay': 'exponential', 'ss_k': 2.0}}, 'seq2seq.ss_k'),
    ({'seq2seq': {'coverage_weight': 1.0}}, 'seq2seq.coverage_weight'),
    ({'seq2seq': {'rl': {'steps': 10}}}, 'seq2seq.rl.init'),
    ({'seq2seq': {'eval_decodes': ('greedy', 'nucleus')}}, 'seq2seq.eval_decodes'),
    ({'model': {'arch': 'encoder'}}, 'model.arch'),
    ({'seq2seq': {'task': {'symbols': 30}}}, 'seq2seq.task.symbols'),
])
def test_bad_values_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    from_config_dict(overrides)


@pytest.mark.parametrize('arch,overrides,message', [
    ('decoder', {'pointer': True}, 'seq2seq.pointer=True is invalid: needs model.arch'),
    ('decoder', {'training': 'two_pass'}, 'seq2seq.training'),
    ('encoder_decoder', {'training': 'scheduled_sampling', 'guided_weight': 1.0}, 'seq2seq.training'),
])
def test_tips_that_need_the_encoder_decoder(arch, overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.check_run(small_config(arch, **overrides))


@pytest.mark.parametrize('arch,model,message', [
    ('decoder', {'ffn': 'moe'}, r"model\.ffn='moe' is invalid: the seq2seq trainers"),
    ('encoder_decoder', {'ffn': 'moe'}, r"model\.ffn='moe' is invalid"),
    ('encoder_decoder', {'norm_placement': 'deepnorm'}, r"model\.norm_placement='deepnorm'.*Table 1"),
])
def test_model_options_the_seq2seq_runs_refuse(arch, model, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.check_run(model_config(arch, **model))


def test_the_decoder_only_prefix_lm_takes_deepnorm():
  config_lib.check_run(model_config('decoder', norm_placement='deepnorm'))   # TransformerLM's own


def model_config(arch, **model):
  return from_config_dict({
      'model': dict(arch=arch, vocab_size=tasks.VOCAB_SIZE, num_layers=1, d_model=16, num_heads=2, **model),
      'seq2seq': {'task': dict(name='reverse', train_len=4)}})


def test_a_test_length_a_learned_table_cannot_serve():
  cfg = from_config_dict({'model': dict(arch='decoder', pos='learned', max_len=40), 'train': {'seq_len': 16},
                          'seq2seq': {'task': dict(name='copy', train_len=4)}})
  config_lib.check_run(dataclasses.replace(cfg, seq2seq=dataclasses.replace(
      cfg.seq2seq, task=dataclasses.replace(cfg.seq2seq.task, test_multipliers=(1, 2)))))
  with pytest.raises(ConfigError, match=r'seq2seq\.task\.test_multipliers.*needs 66 positions.*max_len=40'):
    config_lib.check_run(cfg)                                   # 8N = 32: 32 + 32 + 2 positions


def test_rl_without_a_teacher_forced_checkpoint(tmp_path):
  from lcr.seq2seq import rl
  cfg = small_config(rl={'steps': 2, 'init': str(tmp_path / 'missing')})
  with pytest.raises(ConfigError, match=r'seq2seq\.rl\.init=.*missing.*holds no trained checkpoint'):
    rl.finetune(cfg, str(tmp_path / 'rl'))


def test_the_lm_trainer_refuses_the_encoder_decoder(tmp_path):
  from lcr import train
  with pytest.raises(ConfigError, match=r"model\.arch='encoder_decoder'.*length_generalization"):
    train.train(small_config(), str(tmp_path), data=None)


def test_smoke_study_end_to_end_and_resumes(tmp_path):
  """The smoke preset: teacher forcing, RL fine-tuning from it (which samples), a decoder-only
  model; then a re-run reuses everything, and a lost row is evaluated again."""
  from lcr.seq2seq import evaluate, report, study
  workdir = str(tmp_path / 'study')
  config = cli.load_config_dict('configs/length_generalization.py:smoke')
  written = study.run_study(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'results.jsonl'))]
  assert len(rows) == 3 * 2
  for row in rows:
    assert set(evaluate.RESULT_FIELDS) <= set(row)
    assert 0 <= row['exact_match'] <= row['token_accuracy'] + 1e-9 or row['exact_match'] == 0
    assert 0 <= row['bleu'] <= 100 and row['train_len'] == 3 and row['test_len'] in (3, 6)
  assert {(r['variant'], r['decode']) for r in rows} == {
      ('teacher_forcing', 'greedy'), ('rl', 'greedy'), ('decoder-t5', 'greedy')}
  assert {r['arch'] for r in rows} == {'encoder_decoder', 'decoder'}
  metrics = [json.loads(l) for l in open(os.path.join(workdir, 'models', 'rl', 'metrics.jsonl'))]
  assert metrics[-1]['step'] == 2 and 'reward_sample' in metrics[-1]
  summary = open(written['summary.md']).read()
  assert 'BLEU before and after RL: teacher_forcing → rl' in summary and 'tok:13a' in summary
  assert os.path.getsize(written['length_generalization.png']) > 10_000
  # Resume: nothing is retrained or re-evaluated; a lost row comes back.
  stamp = os.path.getmtime(os.path.join(workdir, 'models', 'teacher_forcing', 'metrics.jsonl'))
  lines = open(os.path.join(workdir, 'results.jsonl')).read().splitlines()
  with open(os.path.join(workdir, 'results.jsonl'), 'w') as f:
    f.write('\n'.join(lines[:-1]) + '\n')
  study.run_study(config, workdir)
  again = open(os.path.join(workdir, 'results.jsonl')).read().splitlines()
  assert len(again) == len(lines)
  assert sorted(json.loads(l)['variant'] + json.loads(l)['decode'] + str(json.loads(l)['test_len'])
                for l in again) == sorted(json.loads(l)['variant'] + json.loads(l)['decode'] +
                                          str(json.loads(l)['test_len']) for l in lines)
  assert os.path.getmtime(os.path.join(workdir, 'models', 'teacher_forcing', 'metrics.jsonl')) == stamp
  assert report.draw_all([workdir], str(tmp_path / 'redraw'))


def test_the_sweep_launcher_runs_this_experiment():
  out = subprocess.run([sys.executable, 'experiments/sweep.py',
                        '--config=configs/length_generalization.py:large', '--workdir=/tmp/s',
                        '--dry_run'], cwd=REPO, capture_output=True, text=True, check=True).stdout
  lines = out.splitlines()
  assert len(lines) == 10 + 1     # 5 tasks × 2 seeds, then the combine step
  assert lines[0].startswith('python experiments/length_generalization.py '
                             '--config=configs/length_generalization.py:large --workdir=/tmp/s/')
  assert '--config.seq2seq.task.name=copy' in lines[0] and lines[-1].endswith('--combine_only')
