"""Generation: a KV cache per attention pattern, prefill and cached steps, decoding strategies.

  * ``cache``       which positions a layer's cache keeps (full, ring, sinks) and how keys are stored;
  * ``layer_cache`` the cache as Flax variables and attention over it (used by lcr.model);
  * ``sampling``    greedy, temperature / top-k / top-p (nucleus) sampling;
  * ``engine``      prefill and one compiled loop of cached steps: :func:`generate`;
  * ``beam``        beam search with the GNMT length penalty: :func:`beam_search`;
  * ``text``        prompts and text: the ``run.py --mode=generate`` entry point.

The model imports ``cache`` and ``layer_cache``; import the others by name (``from lcr.decode
import engine``), which keeps this package importable from lcr.model.
"""
