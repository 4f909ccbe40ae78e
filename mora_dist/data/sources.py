"""Raw text sources (local text / JSONL / Parquet files or folders, or a hub dataset) and the tokenizer.

Every source becomes a ``datasets`` dataset with one ``text`` column, map-style (cached Arrow) or streaming.
A source's ``path`` is one of:

- ``hf://<dataset id>`` (e.g. ``hf://allenai/c4`` with ``hub_config="en"``): read from the Hugging Face hub by
  ``datasets.load_dataset(id, hub_config, split=...)``; streaming reads it on the fly.
- a local folder in the hub's layout, when ``hub_config`` or ``eval_split`` is set: a copy of the hub dataset
  (``git clone`` or ``hf download --repo-type dataset``) read by exactly the same call, so a local copy is one
  ``--set data.sources.<i>.path=...`` away. Without the repo's ``README.md`` (which names each config's files),
  ``<path>/<hub_config>/`` or ``<path>`` itself is read and the splits come from the file names
  (``c4-train.00000-of-01024.json.gz``, ``c4-validation...``), as ``datasets`` does.
- otherwise local files: a .txt / .jsonl / .parquet file (optionally compressed) or a folder of them, one split.

The tokenizer is a ``tokenizer.json``, a local tokenizer folder, or ``hf://<model id>`` (e.g. ``hf://google-t5/t5-base``).
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
HUB_PREFIX = "hf://"


def hub_id(path: str) -> str | None:
    """The hub repository id of an ``hf://<id>`` path, else ``None`` (a local path)."""
    return path.removeprefix(HUB_PREFIX) if path.startswith(HUB_PREFIX) else None


def reads_like_hub(path: str, hub_config: str | None, eval_split: str | None) -> bool:
    """Whether ``datasets.load_dataset`` reads the source as a (hub or local copy of a) dataset with splits."""
    return hub_id(path) is not None or hub_config is not None or eval_split is not None


def _load_dataset_args(path: str, hub_config: str | None) -> tuple[tuple, dict]:
    """``load_dataset`` arguments for a hub id or a local copy of a hub dataset (see the module docstring)."""
    repo = hub_id(path)
    if repo is not None:
        return (repo, hub_config), {}
    root = Path(path)
    if (root / "README.md").is_file():
        return (str(root), hub_config), {}
    if hub_config is not None and (root / hub_config).is_dir():
        return (str(root),), {"data_dir": hub_config}
    return (str(root),), {}


def _builder_of(path: Path) -> str | None:
    name = path.name
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return _BUILDERS.get(Path(name).suffix)


def list_files(path: str | os.PathLike, fmt: str = "auto") -> tuple[str, list[str]]:
    """``(builder, files)`` for a file or a folder (recursive, sorted; files of other formats are skipped), or
    ``("megatron", [<prefix>.bin, <prefix>.idx])`` for a Megatron indexed dataset prefix.

    Raises:
        MoRAConfigError: nothing readable at ``path``, or a folder mixing formats with ``fmt="auto"``.
    """
    if fmt == "megatron":  # a .bin/.idx prefix (mora_dist.data.indexed), not a file or folder
        return "megatron", [f"{path}.bin", f"{path}.idx"]
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
    path: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    eval_split: str | None = None,
    fmt: str = "auto",
    text_field: str = "text",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Split ``split`` of one source as a dataset with a single ``text`` column.

    Plain text files give one sample per paragraph (blank-line separated), so documents are not cut into lines
    before packing. An ``hf://`` path needs the hub at run time (see :func:`mora_dist.data.hub.check_hub`).
    """
    if reads_like_hub(path, hub_config, eval_split):
        args, kwargs = _load_dataset_args(path, hub_config)
        try:
            ds = datasets.load_dataset(*args, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            raise MoRAConfigError(
                f"data source path={path!r} (hub_config={hub_config!r}, split={split!r}) cannot be read as a "
                f"Hugging Face dataset: {exc}. A local copy must be in the hub's layout (the repo's README.md, or "
                "files named <name>-<split>.* per config folder); for plain files drop hub_config and eval_split"
            ) from exc
    else:
        builder, files = list_files(path, fmt)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming,
                                   cache_dir=cache_dir, **kwargs)
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise MoRAConfigError(f"data source {path!r} has no column text_field={text_field!r}; "
                              f"its columns are {columns}: set the source's text_field")
    ds = ds.select_columns([text_field])  # first: a source may hold a "text" column besides text_field
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> None:
    """Train a byte-level BPE (EOS ``<|endoftext|>``) on ``texts`` and write ``tokenizer.json`` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # only training a tokenizer needs it

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
    """A ``tokenizer.json`` file (EOS ``<|endoftext|>``), a Hugging Face tokenizer folder, or ``hf://<model id>``
    from the hub; it must have EOS."""
    repo = hub_id(str(path))
    p = Path(path)
    if repo is not None:
        tok = AutoTokenizer.from_pretrained(repo)
    elif p.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), eos_token=EOS_TOKEN)
    else:
        tok = AutoTokenizer.from_pretrained(str(p))
    if tok.eos_token_id is None:
        raise MoRAConfigError(f"data.tokenizer={str(path)!r} has no EOS token; packing separates documents with it")
    return tok
