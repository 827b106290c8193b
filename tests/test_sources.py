"""Model sources: what is cached is trusted only while it is whole and of the same content."""

import hashlib
import json

import pytest

from specchat.sources import resolve as sources
from specchat.common.errors import CorruptModel
from specchat.sources.registry import PartsSpec


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three part files standing in for the installed part packages."""
    chunks = [b"alpha" * 1000, b"beta" * 999, b"gamma"]
    files = []
    for n, chunk in enumerate(chunks, 1):
        file = tmp_path / f"part{n:02d}.bin"
        file.write_bytes(chunk)
        files.append(file)
    monkeypatch.setattr(sources, "part_files", lambda spec: files)
    whole = b"".join(chunks)
    return PartsSpec("pkg-{n}", "1.0", 3, "data/part{n:02d}.bin", len(whole), hashlib.sha256(whole).hexdigest())


def test_assembled_parts_are_reused_only_while_whole(parts, tmp_path):
    dest = tmp_path / "cache" / "model.gguf"
    messages = []
    assert sources.assemble_parts(parts, dest, messages.append).stat().st_size == parts.bytes
    sources.assemble_parts(parts, dest, messages.append)
    assert len(messages) == 1  # the second call trusted the verified file
    with open(dest, "r+b") as handle:  # a crash that left it short after the stamp
        handle.truncate(parts.bytes // 2)
    sources.assemble_parts(parts, dest, messages.append)
    assert len(messages) == 2 and dest.stat().st_size == parts.bytes
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == parts.sha256


def test_parts_that_do_not_match_their_checksum_leave_nothing_trusted(parts, tmp_path):
    bad = PartsSpec(parts.package, parts.version, parts.count, parts.file, parts.bytes, "0" * 64)
    dest = tmp_path / "model.gguf"
    with pytest.raises(CorruptModel, match="does not match its checksum"):
        sources.assemble_parts(bad, dest)
    assert list(tmp_path.glob("model.gguf*")) == []


@pytest.mark.parametrize(
    "marker, reused",
    [
        ({"gguf": "x", "bytes": 1, "source": "sha-new"}, True),
        ({"gguf": "x", "bytes": 1, "source": "sha-old"}, False),  # the demo packages were upgraded
        ({"gguf": "x", "bytes": 1}, False),  # made before conversions recorded their source
        ("not json", False),
    ],
)
def test_a_conversion_is_reused_only_for_the_same_source(tmp_path, marker, reused):
    out_dir = tmp_path / "converted"
    out_dir.mkdir()
    (out_dir / sources.MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    missing_gguf = tmp_path / "model.gguf"
    missing_gguf.write_bytes(b"not a gguf")
    if reused:
        assert sources.convert_gguf(missing_gguf, out_dir, source_id="sha-new") == out_dir
    else:  # it converts again (and this file is no GGUF)
        with pytest.raises(CorruptModel, match="cannot read"):
            sources.convert_gguf(missing_gguf, out_dir, source_id="sha-new")
        assert (out_dir / sources.MARKER).exists()  # a failed conversion keeps what was there
