"""The data room: corpora, tokenizers and the grain input pipeline.

    data_cfg = from_mapping(DataConfig, config_dict.data, 'data')
    iterator = make_train_iterator(data_cfg, seq_len=64, batch_size=32, seed=0)
    batch = next(iterator)  # inputs, targets, positions, segment_ids, weights: [32, 64]
    tokenizer = get_tokenizer(data_cfg)
    stream = load_eval_tokens(data_cfg, 'validation')
"""

from lcr.data.config import DataConfig, resolve_data_dir
from lcr.data.corpora import CorpusUnavailableError, open_split
from lcr.data.pipeline import (count_text_bytes, load_eval_tokens, make_train_dataset,
                               make_train_iterator, prepare_data, train_rows)
from lcr.data.token_cache import TokenStream
from lcr.data.tokenizers import Tokenizer, get_tokenizer

__all__ = [
    'CorpusUnavailableError',
    'DataConfig',
    'TokenStream',
    'Tokenizer',
    'count_text_bytes',
    'get_tokenizer',
    'load_eval_tokens',
    'make_train_dataset',
    'make_train_iterator',
    'open_split',
    'prepare_data',
    'resolve_data_dir',
    'train_rows',
]
