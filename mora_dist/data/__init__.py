"""Data: sources, tokenisation and packing, weighted mixtures, data-parallel sharding with an exact resume point."""

from mora_dist.data.mixture import MapReader, Mixture, StreamReader, head_blocks, split_eval
from mora_dist.data.packing import pack_token_lists, tokenize_and_pack
from mora_dist.data.sharding import ShardedBatches, eval_shard
from mora_dist.data.sources import list_files, load_text_source, load_tokenizer, train_tokenizer

__all__ = [
    "MapReader",
    "Mixture",
    "ShardedBatches",
    "StreamReader",
    "eval_shard",
    "head_blocks",
    "list_files",
    "load_text_source",
    "load_tokenizer",
    "pack_token_lists",
    "split_eval",
    "tokenize_and_pack",
    "train_tokenizer",
]
