import hashlib

from gigatrain import paths


def test_sha256_file_reads_in_chunks_and_matches_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "HASH_CHUNK", 7)  # several chunks and a short last one
    data = bytes(range(256)) * 3
    file = tmp_path / "shard.bin"
    file.write_bytes(data)
    assert paths.sha256_file(file) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert paths.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
