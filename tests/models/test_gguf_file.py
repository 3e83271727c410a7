"""The fast GGUF header reader agrees with gguf-py's GGUFReader on every field and tensor, and refuses broken files."""

import struct

import numpy as np
import pytest
from gguf_helpers import model_on
from references import require

from loraforge.export.gguf_writer import open_writer, write_gguf
from loraforge.models import tiny_tokenizer
from loraforge.models.gguf_file import GGUFFile
from loraforge.models.sources import default_gguf_path


def assert_same_as_gguf_py(path):
    gguf = require("gguf")
    theirs, ours = gguf.GGUFReader(str(path), "r"), GGUFFile(path)
    assert list(ours.fields) == [key for key in theirs.fields if not key.startswith("GGUF.")]
    for key, field in ours.fields.items():
        reference = theirs.fields[key]
        assert field.contents() == reference.contents(), key
        assert field.value_type == reference.types[0], key
        if field.value_type == gguf.GGUFValueType.ARRAY:
            assert field.item_type == gguf.GGUFValueType(int(reference.parts[3][0])), key
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == (
            reference.name, reference.tensor_type, reference.n_elements, reference.n_bytes, reference.data_offset)
        assert mine.shape.tolist() == reference.shape.tolist()
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        assert np.array_equal(mine.data, reference.data, equal_nan=True), mine.name


@pytest.mark.parametrize("base", ["q4_1", "q8_0", None])
def test_a_written_file_reads_as_gguf_py_reads_it(tmp_path, base):
    path = tmp_path / "m.gguf"
    write_gguf(model_on(base), tiny_tokenizer(), path)
    assert_same_as_gguf_py(path)


def test_the_default_model_reads_as_gguf_py_reads_it():
    assert_same_as_gguf_py(default_gguf_path())


def test_every_value_type_and_an_empty_array_round_trip(tmp_path):
    gguf = require("gguf")
    V = gguf.GGUFValueType
    path = tmp_path / "kinds.gguf"
    writer = open_writer(path, "llama")
    writer.add_key_value("t.u8", 7, V.UINT8)
    writer.add_key_value("t.i64", -5, V.INT64)
    writer.add_key_value("t.f64", 0.25, V.FLOAT64)
    writer.add_key_value("t.bool", True, V.BOOL)
    writer.add_key_value("t.text", "héllo", V.STRING)
    writer.add_key_value("t.floats", [1.5, -2.0], V.ARRAY, V.FLOAT32)
    writer.add_key_value("t.words", ["a", "", "ü"], V.ARRAY, V.STRING)
    writer.add_key_value("t.none", [], V.ARRAY, V.INT32)
    writer.add_tensor("x.weight", np.arange(6, dtype=np.float16).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_as_gguf_py(path)
    fields = GGUFFile(path).fields
    assert fields["t.none"].contents() == [] and fields["t.none"].item_type == V.INT32
    assert fields["t.words"].contents() == ["a", "", "ü"]


@pytest.mark.parametrize("damage", ["magic", "version", "cut_header", "cut_string", "value_type", "tensor_type"])
def test_a_broken_header_is_a_value_error_naming_what_is_wrong(tmp_path, damage):
    source = tmp_path / "m.gguf"
    write_gguf(model_on("q4_1"), tiny_tokenizer(), source)
    data = bytearray(source.read_bytes())
    first_key_at = 4 + struct.calcsize("<IQQ")
    key_length = struct.unpack_from("<Q", data, first_key_at)[0]
    value_type_at = first_key_at + 8 + key_length
    if damage == "magic":
        data[:4], expected = b"GGML", "GGUF magic"
    elif damage == "version":
        data[4:8], expected = struct.pack("<I", 9), "version 9"
    elif damage == "cut_header":
        data, expected = data[:first_key_at + 4], "cut short or corrupt"
    elif damage == "cut_string":
        data[first_key_at:first_key_at + 8], expected = struct.pack("<Q", 10**9), "runs past the end"
    elif damage == "value_type":
        data[value_type_at:value_type_at + 4], expected = struct.pack("<I", 99), "unknown GGUF value type 99"
    else:
        reader = GGUFFile(source)
        info_end = reader.tensors[0].data_offset  # the first tensor's info ends before the aligned data start
        name = reader.tensors[0].name.encode()
        at = bytes(data).index(name, 0, info_end) + len(name)
        n_dims = struct.unpack_from("<I", data, at)[0]
        type_at = at + 4 + 8 * n_dims
        data[type_at:type_at + 4], expected = struct.pack("<I", 250), "unknown type 250"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=expected):
        GGUFFile(broken)
