"""Token mixers other than softmax attention, and attention with a memory of earlier segments.

``model.mixer`` replaces attention in every block (the block keeps its norms, residuals and FFN);
``model.memory`` gives attention a memory. Each module cites its paper and equations:

  * ``linear``    causal linear attention, Katharopoulos et al. 2020 (parallel and recurrent);
  * ``retention`` multi-scale retention, RetNet, Sun et al. 2023 (parallel, recurrent, chunkwise);
  * ``ssm``       a selective state-space layer, Mamba's S6, Gu & Dao 2023 (associative scan);
  * ``xl``        segment-level recurrence, Transformer-XL, Dai et al. 2019;
  * ``infini``    compressive memory, Infini-attention, Munkhdalai et al. 2024.

Every one keeps its recurrent state in the Flax ``cache`` collection, as lcr.decode's KV cache does,
so the same code trains (no state: the parallel or chunked form), evaluates a stream of any length in
constant memory (``stream``), carries the state from step to step on contiguous training streams
(``carry``) and generates through lcr.decode (prefill, then one token per step). The helpers:

  * ``checks``    config validation (names and numbers only; lcr.config calls it);
  * ``registry``  the module a block uses for ``model.mixer``/``model.memory`` (lcr.model);
  * ``state``     token bookkeeping (real tokens, documents) and state variables shared by all.

Import submodules by name (``from lcr.mixers import registry``): this package imports nothing, so
lcr.config can import ``checks`` without JAX.
"""
