"""Sources: text / JSONL / Parquet files and folders become one ``text`` column; the tokenizer is trained on
first use."""

import json
import shutil

import datasets
import pytest

from mora_dist.data import list_files, load_text_source, load_tokenizer, train_tokenizer
from mora_dist.errors import MoRAConfigError


def _corpus(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph,\nstill first.\n\nSecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(3)))
    datasets.Dataset.from_dict({"text": ["pq one", "pq two"]}).to_parquet(str(tmp_path / "c.parquet"))


def test_each_format_loads_as_a_text_column(tmp_path):
    _corpus(tmp_path)
    txt = load_text_source(path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "cache"))
    assert [t.strip() for t in txt["text"]] == ["First paragraph,\nstill first.", "Second paragraph."]  # paragraphs
    js = load_text_source(path=str(tmp_path / "b.jsonl"), text_field="body", cache_dir=str(tmp_path / "cache"))
    assert js.column_names == ["text"] and list(js["text"]) == ["doc 0", "doc 1", "doc 2"]
    pq = load_text_source(path=str(tmp_path / "c.parquet"), streaming=True)
    assert [r["text"] for r in pq] == ["pq one", "pq two"]


def test_gzip_text_folder_and_mixed_folder(tmp_path):
    (tmp_path / "gz" / "sub").mkdir(parents=True)
    for name in ("plays", "poems"):
        shutil.copy(f"data/shakespeare/{name}.txt.gz", tmp_path / "gz" / "sub")
    builder, files = list_files(tmp_path / "gz")
    assert builder == "text" and [f.rsplit("/", 1)[1] for f in files] == ["plays.txt.gz", "poems.txt.gz"]
    _corpus(tmp_path)
    with pytest.raises(MoRAConfigError, match="set the source's format"):
        list_files(tmp_path)
    with pytest.raises(MoRAConfigError, match="text_field='missing'"):
        load_text_source(path=str(tmp_path / "b.jsonl"), text_field="missing", cache_dir=str(tmp_path / "cache"))


def test_train_tokenizer_on_first_use(tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer(["the king the queen the prince"] * 50, 300, out)
    tok = load_tokenizer(out)
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok("the queen")["input_ids"]) == "the queen"
