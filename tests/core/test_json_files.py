"""json_files.read_json_object: the one reader of "a JSON object from a file, or why not"."""

import pytest

from baichuan_finetune.core.json_files import JSONObjectError, read_json_object


def test_an_object_is_returned(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1, "b": [2]}', encoding="utf-8")
    assert read_json_object(path) == {"a": 1, "b": [2]}
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')  # a byte-order mark, as some editors write
    assert read_json_object(path, encoding="utf-8-sig") == {"a": 1}


@pytest.mark.parametrize("content, reason, cause", [
    (None, "cannot read: No such file or directory", FileNotFoundError),
    (b'{"a": ', "not valid JSON: Expecting value: line 1 column 7 (char 6)", ValueError),
    (b'{"a": "\xff"}', "not valid JSON: 'utf-8' codec can't decode byte 0xff", UnicodeDecodeError),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON", RecursionError),
    (b"[1, 2]", "expected a JSON object, found list", None),
    (b'"text"', "expected a JSON object, found str", None),
])
def test_each_problem_is_one_line_naming_the_file(tmp_path, content, reason, cause):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(JSONObjectError) as info:
        read_json_object(path)
    e = info.value
    assert e.path == path and e.reason.startswith(reason)
    assert str(e) == f"{path}: {e.reason}" and "\n" not in str(e)
    assert isinstance(e.cause, cause) if cause else e.cause is None
    assert isinstance(e, ValueError)


def test_a_directory_cannot_be_read(tmp_path):
    with pytest.raises(JSONObjectError, match=r": cannot read: Is a directory$"):
        read_json_object(tmp_path)


def test_what_the_object_holds_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("[]")
    with pytest.raises(JSONObjectError, match=r"ds\.json: expected a JSON object of DeepSpeed options, found list$"):
        read_json_object(path, of=" of DeepSpeed options")
