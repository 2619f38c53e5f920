"""Every config field at its default, as an ml_collections ConfigDict.

Experiment files start from ``get_config()`` here and change only what they need; the defaults and
their documentation live in the dataclasses of ``lcr/config.py`` and ``lcr/data/config.py``, so a
field added there appears here (and becomes overridable with ``--config.a.b=v``) by itself.
"""

import ml_collections

from lcr.config import Config, to_dict


def get_config() -> ml_collections.ConfigDict:
  """seed, model, data, train, eval, mesh — all defaults.

  model.vocab_size is set from the tokenizer when training starts (and recorded in
  workdir/config.json), so configs never need to match it by hand.
  """
  return ml_collections.ConfigDict(to_dict(Config()))
