from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.options import ConfigError
from stages.ingest import Ingest, InputError, canonical


@pytest.fixture
def stage(tmp_path: Path, make_stage):
    """stage(inputs, **options) -> an Ingest stage over these input files."""

    def build(inputs: list[str], **options) -> Ingest:
        return make_stage(tmp_path, "ingest", inputs, **options)

    return build


def results(st: Ingest):
    return {r.key: r for r in st.process(st.source_rows())}


def disco(path: Path, **columns) -> str:
    base = {
        "video_url_youtube": ["https://www.youtube.com/watch?v=dQw4w9WgXcQ", "https://youtu.be/9bZkp7q19f0"],
        "video_title_youtube": ["Song ../../etc/passwd", "Gangnam"],
        "video_duration_youtube_sec": [213.0, 4000.0],
        "primary_artist_name_spotify": ["Rick", "PSY"],
        "artist_id_spotify": [["a1"], ["a2"]],
        "track_id_spotify": ["t1", "t2"],
        "similarity_audio": [0.9, 0.7],
        "audio_embedding_spotify": [[0.1] * 4, [0.2] * 4],
    }
    base.update(columns)
    pq.write_table(pa.table(base), path)
    return str(path)


def test_disco_parquet_columns_are_mapped(tmp_path: Path, stage):
    out = results(stage([disco(tmp_path / "d.parquet")]))
    r = out["yt_dQw4w9WgXcQ"]
    assert r.status == "ok"
    assert r.metrics["artist"] == "Rick" and r.metrics["artist_id"] == "a1"
    assert r.metrics["title"] == "Song ../../etc/passwd"  # kept as metadata, never used as a path
    assert r.metrics["source"] == "disco10m"
    assert r.metrics["license"] == "youtube-standard (unverified)"
    assert "similarity_audio" in r.metrics["disco_scores"]


def test_max_duration_drops_with_reason(tmp_path: Path, stage):
    out = results(stage([disco(tmp_path / "d.parquet")], max_duration_s=600))
    assert out["yt_9bZkp7q19f0"].status == "dropped"
    assert out["yt_9bZkp7q19f0"].reason.startswith("too_long")


def test_yt8m_ids_and_url_lists_are_validated(tmp_path: Path, stage, write_lines):
    ids = write_lines(tmp_path / "yt8m.txt", ["dQw4w9WgXcQ", "short", "# comment", "kJQP7kiw5Fk"])
    urls = write_lines(tmp_path / "urls.txt", [
        "https://example.org/a.mp4", "file:///etc/passwd", "ftp://example.org/x.mp4",
        "javascript:alert(1)", "https://youtube.com/watch?v=bad", "https://youtu.be/kJQP7kiw5Fk",
    ])
    out = results(stage([f"yt8m={ids}", urls]))
    reasons = sorted(r.reason.split(":")[0] for r in out.values() if r.status == "failed")
    assert reasons == ["bad_id", "bad_id", "bad_url", "bad_url", "bad_url"]
    assert out["yt_kJQP7kiw5Fk"].metrics["source"] == "yt8m"
    assert out["yt_kJQP7kiw5Fk"].metrics["also_in"] == [f"urls:{urls}:5"]
    assert sum(k.startswith("url_") for k in out) == 1
    assert len(out) == 3 + 5  # 3 distinct videos, 5 rejected rows — none lost


def test_dedupe_across_sources_keeps_first(tmp_path: Path, stage, write_lines):
    d = disco(tmp_path / "d.parquet")
    ids = write_lines(tmp_path / "ids.txt", ["dQw4w9WgXcQ"])
    out = results(stage([ids, d]))
    assert out["yt_dQw4w9WgXcQ"].metrics["source"] == "ids"
    assert out["yt_dQw4w9WgXcQ"].metrics["also_in"] == [f"disco10m:{d}:0"]


def test_csv_with_header_and_non_utf8(tmp_path: Path, stage):
    path = tmp_path / "list.csv"
    path.write_bytes(b"url,title\nhttps://example.org/v.mp4,caf\xe9 ; rm -rf /\n")
    out = results(stage([str(path)]))
    (r,) = out.values()
    assert r.status == "ok" and r.metrics["title"].startswith("caf")


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"not parquet at all", "not a readable Parquet"),
])
def test_broken_files_fail_fast(tmp_path: Path, content: bytes, message: str, stage):
    path = tmp_path / "in.parquet"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        stage([str(path)]).source_rows()


def test_parquet_without_url_column_names_the_columns(tmp_path: Path, stage):
    path = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({"link": ["https://x.org/a.mp4"], "name": ["a"]}), path)
    with pytest.raises(InputError, match=r"no URL or id column.*video_url_youtube.*found \['link', 'name'\]"):
        stage([str(path)]).source_rows()


def test_missing_input_file(tmp_path: Path, stage):
    with pytest.raises(InputError, match="no such file"):
        stage([str(tmp_path / "nope.txt")]).source_rows()


def test_limit_and_sample_are_deterministic(tmp_path: Path, stage, write_lines):
    ids = write_lines(tmp_path / "ids.txt", [f"{i:011d}" for i in range(200)])
    assert len(stage([ids], limit=7).source_rows()) == 7
    a = [r["key"] for r in stage([ids], sample=0.25).source_rows()]
    b = [r["key"] for r in stage([ids], sample=0.25).source_rows()]
    assert a == b and 20 < len(a) < 80


def test_youtube_url_forms():
    for raw in ["dQw4w9WgXcQ", "https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=3",
                "https://youtu.be/dQw4w9WgXcQ", "https://www.youtube.com/shorts/dQw4w9WgXcQ"]:
        assert canonical(raw)[0] == "yt_dQw4w9WgXcQ"


def test_empty_inputs_is_a_config_error(tmp_path: Path, stage):
    with pytest.raises(InputError, match="ingest.inputs"):
        stage([]).source_rows()
    assert issubclass(InputError, ValueError) and not issubclass(InputError, ConfigError)


def test_the_arrow_keys_agree_with_canonical_row_by_row():
    """canonical_columns (Arrow kernels, Python only for the rest) gives canonical()/key_of()'s answer
    for every row: ids, DISCO-10M's plain watch URLs and their near misses, other URLs, junk."""
    import random

    from pipeline.sources.inputs import canonical_columns, key_of

    rng = random.Random(7)
    alphabet = "abcXYZ019_-"
    pieces = ["https://", "http://", "www.", "m.", "music.", "youtube.com", "youtu.be", "/watch?v=", "/shorts/",
              "&t=1", "#x", "?", " ", "\n", "\t", "é", "ftp://", "javascript:", "/", "v=", "example.org"]
    values = []
    for _ in range(3000):
        vid = "".join(rng.choice(alphabet) for _ in range(rng.choice([4, 10, 11, 11, 12])))
        base = rng.choice(["https://www.youtube.com/watch?v={}", "{}", "https://youtu.be/{}", " {} ",
                           "http://m.youtube.com/watch?v={}&list=x", "https://example.org/{}.mp4", "{}"])
        value = base.format(vid)
        for _ in range(rng.choice([0, 0, 1, 2])):  # mutations: a piece inserted anywhere
            at = rng.randrange(len(value) + 1)
            value = value[:at] + rng.choice(pieces) + value[at:]
        values.append(value.strip())
    rows = list(range(len(values)))
    got = canonical_columns(pa.chunked_array([pa.array(values)]), "src", pa.chunked_array([pa.repeat("f.txt", len(rows))]),
                            pa.chunked_array([pa.array(rows, pa.int64())]))
    pseudo = got["yt8m_id"].to_pylist()
    for i, value in enumerate(values):
        if pseudo[i] is not None:
            assert pseudo[i] == value and len(value) == 4
            continue
        want = key_of(value, "src", ("f.txt", i))
        have = tuple(got[name][i].as_py() for name in ("key", "url", "youtube_id", "problem"))
        assert have[0] == want[0] and have[2:] == want[2:], (value, have, want)
        assert have[1] == (want[1] or value[:2000]), (value, have, want)
