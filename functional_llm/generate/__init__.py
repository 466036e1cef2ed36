"""Decoding: a key/value cache held as a value (:mod:`.cache`), generation with it
(:mod:`.search`: greedy, keyed sampling, EOS, left-padded batches), and sliding-window sampling
without a cache (:mod:`.window`, for samples longer than the model's context)."""

from functional_llm.generate import processors
from functional_llm.generate.beam import Beams, beam_search, search
from functional_llm.generate.cache import (
    KVCache,
    decode_step,
    encode,
    init_cache,
    prefill,
    reorder,
)
from functional_llm.generate.search import (
    Generation,
    decoder,
    generate,
    left_pad,
    stop_sequences,
    stop_strings,
)
from functional_llm.generate.window import sample

__all__ = [
    "Beams",
    "Generation",
    "KVCache",
    "beam_search",
    "decode_step",
    "decoder",
    "encode",
    "generate",
    "init_cache",
    "left_pad",
    "prefill",
    "processors",
    "reorder",
    "sample",
    "search",
    "stop_sequences",
    "stop_strings",
]
