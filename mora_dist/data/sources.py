"""Raw text sources (local text / JSONL / Parquet files or folders, or a hub dataset) and the tokenizer.

Every source becomes a ``datasets`` dataset with one ``text`` column, map-style (cached Arrow) or streaming.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mora_dist.errors import MoRAConfigError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Extension (compression suffix stripped) -> ``datasets`` builder.
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_FORMATS = {"text": "text", "jsonl": "json", "parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def _builder_of(path: Path) -> str | None:
    name = path.name
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return _BUILDERS.get(Path(name).suffix)


def list_files(path: str | os.PathLike, fmt: str = "auto") -> tuple[str, list[str]]:
    """``(builder, files)`` for a file or a folder (recursive, sorted; files of other formats are skipped).

    Raises:
        MoRAConfigError: nothing readable at ``path``, or a folder mixing formats with ``fmt="auto"``.
    """
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file() and _builder_of(f)) if p.is_dir() else [p]
    if not files or not p.exists():
        raise MoRAConfigError(f"data source path={str(path)!r} holds no .txt/.jsonl/.json/.parquet files "
                              "(optionally .gz): point it at a corpus")
    if fmt != "auto":
        return _FORMATS[fmt], [str(f) for f in files]
    builders = {_builder_of(f) for f in files}
    if None in builders or len(builders) != 1:
        raise MoRAConfigError(f"data source path={str(path)!r}: cannot tell the format from the file names "
                              f"({sorted(map(str, builders))}); set the source's format to text, jsonl or parquet")
    return builders.pop(), [str(f) for f in files]


def load_text_source(
    *,
    path: str | None = None,
    hub: str | None = None,
    hub_config: str | None = None,
    split: str = "train",
    fmt: str = "auto",
    text_field: str = "text",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """One source as a dataset with a single ``text`` column.

    Plain text files give one sample per paragraph (blank-line separated), so documents are not cut into lines
    before packing. ``hub`` needs a machine that is online (or a populated Hugging Face cache).
    """
    if path is not None:
        builder, files = list_files(path, fmt)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming,
                                   cache_dir=cache_dir, **kwargs)
    else:
        ds = datasets.load_dataset(hub, hub_config, split=split, streaming=streaming, cache_dir=cache_dir)
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise MoRAConfigError(f"data source {path or hub!r} has no column text_field={text_field!r}; "
                              f"its columns are {columns}: set the source's text_field")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    if columns is not None:
        ds = ds.remove_columns([c for c in columns if c not in ("text", text_field)])
    return ds


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> None:
    """Train a byte-level BPE (EOS ``<|endoftext|>``) on ``texts`` and write ``tokenizer.json`` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    logger.info("trained a %d-token byte-level BPE -> %s", tok.get_vocab_size(), out)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A ``tokenizer.json`` file (EOS ``<|endoftext|>``) or a Hugging Face tokenizer folder; it must have EOS."""
    p = Path(path)
    if p.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), eos_token=EOS_TOKEN)
    else:
        tok = AutoTokenizer.from_pretrained(str(p))
    if tok.eos_token_id is None:
        raise MoRAConfigError(f"data.tokenizer={str(path)!r} has no EOS token; packing separates documents with it")
    return tok
