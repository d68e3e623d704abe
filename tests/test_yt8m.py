"""YouTube-8M as distributed: TFRecords (written with the `tfrecord` package: real framing, CRCs and
tf.train.Example protos) + vocabulary.csv, pseudo ids resolved through a lookup service served
from 127.0.0.1."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_ingest import disco
from tfrecord.writer import TFRecordWriter

from pipeline.config import ConfigError
from pipeline.manifest import ManifestStore
from pipeline.runner import run_stage
from pipeline.sources import yt8m
from stages.ingest import InputError

VOCABULARY = """Index,TrainVideoCount,KnowledgeGraphId,Name,WikiUrl,Vertical1
0,788288,/m/04rlf,Music,https://en.wikipedia.org/wiki/Music,Arts & Entertainment
1,116043,/m/0mdxd,Music video,https://en.wikipedia.org/wiki/Music_video,Arts & Entertainment
2,200813,/m/07yv9,Vehicle,https://en.wikipedia.org/wiki/Vehicle,Autos & Vehicles
3,38400,/m/01jddz,Concert,https://en.wikipedia.org/wiki/Concert,Arts & Entertainment
"""
# pseudo id → (labels, what the lookup service answers)
VIDEOS = {
    "Aa01": ([0, 1], ("ok", "dQw4w9WgXcQ")),  # the same video as the DISCO-10M fixture's first row
    "Bb02": ([1], ("ok", "kJQP7kiw5Fk")),
    "Cc03": ([2], ("ok", "xxxxxxxxxxx")),  # a vehicle video: never a candidate, never looked up
    "Dd04": ([1], ("404", None)),
    "Ee05": ([1], ("500", None)),
    "Ff06": ([1, 3], ("malformed", None)),
    "Gg07": ([1], ("flaky", "OPf0YbXqDm0")),  # one 503, then the answer
}


class LookupService:
    """The lookup service's JSONP, per pseudo id, counting requests."""

    def __init__(self) -> None:
        self.answers = {pid: answer for pid, (_, answer) in VIDEOS.items()}
        self.counts: Counter = Counter()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                pid = parts[-1].removesuffix(".js")
                service.counts[pid] += 1
                kind, youtube_id = service.answers.get(pid, ("404", None))
                if parts[:3] != ["2", "j", "i"] or parts[3] != pid[:2]:
                    kind = "404"
                if kind == "flaky" and service.counts[pid] == 1:
                    kind = "503"
                body = {
                    "ok": f'i("{pid}","{youtube_id}");', "flaky": f'i("{pid}","{youtube_id}");',
                    "malformed": "<html>we moved</html>",
                }.get(kind)
                if body is None:
                    self.send_error(int(kind))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/javascript")
                self.end_headers()
                self.wfile.write(body.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture
def service():
    svc = LookupService()
    thread = threading.Thread(target=svc.httpd.serve_forever, daemon=True)
    thread.start()
    yield svc
    svc.httpd.shutdown()
    svc.httpd.server_close()


def write_tfrecords(folder: Path) -> Path:
    """Two video-level files and one frame-level (SequenceExample) file, plus vocabulary.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.csv").write_text(VOCABULARY)
    rng = np.random.default_rng(0)
    files = {"train0000.tfrecord": ["Aa01", "Cc03", "Dd04"], "train0001.tfrecord": ["Ee05", "Ff06", "Gg07"]}
    for name, ids in files.items():
        writer = TFRecordWriter(str(folder / name))
        for pid in ids:
            writer.write({
                "id": (pid.encode(), "byte"),
                "labels": (VIDEOS[pid][0], "int"),
                "mean_rgb": (rng.random(1024, dtype=np.float32), "float"),
                "mean_audio": (rng.random(128, dtype=np.float32), "float"),
            })
        writer.close()
    writer = TFRecordWriter(str(folder / "frame0000.tfrecord"))
    writer.write({"id": (b"Bb02", "byte"), "labels": (VIDEOS["Bb02"][0], "int")},
                 {"rgb": ([rng.bytes(1024) for _ in range(3)], "byte"), "audio": ([rng.bytes(128)] * 3, "byte")})
    writer.close()
    return folder


def settings(service: LookupService, **more: object) -> dict[str, object]:
    return {"yt8m_lookup_url": service.url, "yt8m_allow_private_hosts": True, "yt8m_lookup_retries": 2,
            "yt8m_lookup_backoff_s": 0.01, "yt8m_lookup_rate": 200.0, **more}


@pytest.fixture
def results(make_stage):
    """results(tmp_path, inputs, **ingest options) -> {key: Result} of ingest over these inputs."""

    def run(tmp_path: Path, inputs: list[str], **ingest: object) -> dict:
        st = make_stage(tmp_path, "ingest", inputs, **ingest)
        return {r.key: r for r in st.process(st.source_rows())}

    return run


def test_music_videos_resolve_dedupe_fail_with_reasons_and_cache(tmp_path: Path, service: LookupService, results):
    d = disco(tmp_path / "d.parquet")
    folder = write_tfrecords(tmp_path / "yt8m")
    out = results(tmp_path, [d, f"yt8m={folder}/*.tfrecord"], **settings(service))
    ok = {k: r for k, r in out.items() if r.status == "ok"}
    # DISCO's two rows, plus two YouTube-8M music videos of their own; the DISCO row keeps its key
    assert set(ok) == {"yt_dQw4w9WgXcQ", "yt_9bZkp7q19f0", "yt_kJQP7kiw5Fk", "yt_OPf0YbXqDm0"}
    assert ok["yt_dQw4w9WgXcQ"].metrics["source"] == "disco10m"
    assert ok["yt_dQw4w9WgXcQ"].metrics["also_in"] == [f"yt8m:{folder / 'train0000.tfrecord'}:0"]
    bb = ok["yt_kJQP7kiw5Fk"].metrics
    assert bb["yt8m_id"] == "Bb02" and bb["yt8m_labels"] == ["Music video"] and bb["source"] == "yt8m"
    assert bb["url"] == "https://www.youtube.com/watch?v=kJQP7kiw5Fk"
    assert bb["input_file"] == str(folder / "frame0000.tfrecord") and bb["input_row"] == 0
    failed = {r.metrics["yt8m_id"]: r for r in out.values() if r.status == "failed"}
    assert set(failed) == {"Dd04", "Ee05", "Ff06"}
    assert failed["Dd04"].reason == "unresolved: not in the YouTube-8M lookup service (HTTP 404)"
    assert failed["Ee05"].reason.startswith("unresolved: lookup failed 3 times (HTTP 500)")
    assert failed["Ff06"].reason.startswith("unresolved: malformed lookup answer '<html>")
    assert failed["Ff06"].metrics["yt8m_labels"] == ["Music video"]  # Concert is not selected
    assert "Cc03" not in service.counts and not any(r.metrics.get("yt8m_id") == "Cc03" for r in out.values())
    assert service.counts["Gg07"] == 2 and service.counts["Ee05"] == 3

    # A re-run asks only what was not definitive (the 5xx); once that answers, nothing at all.
    service.answers["Ee05"] = ("ok", "HHHHHHHHHHH")
    before = Counter(service.counts)
    again = results(tmp_path, [d, f"yt8m={folder}/*.tfrecord"], **settings(service))
    assert service.counts - before == Counter({"Ee05": 1})
    assert again["yt_HHHHHHHHHHH"].status == "ok"
    before = Counter(service.counts)
    third = results(tmp_path, [d, f"yt8m={folder}"], **settings(service))  # the folder: same files
    assert service.counts == before
    assert {k for k, r in third.items() if r.status == "ok"} == set(ok) | {"yt_HHHHHHHHHHH"}


def test_pseudo_id_lists_resolve_like_tfrecords(tmp_path: Path, service: LookupService, results, write_lines):
    ids = write_lines(tmp_path / "ids.txt", ["Bb02", "Dd04", "dQw4w9WgXcQ", "short"])
    out = results(tmp_path, [f"yt8m={ids}"], **settings(service))
    assert out["yt_kJQP7kiw5Fk"].metrics["yt8m_id"] == "Bb02" and out["yt_dQw4w9WgXcQ"].status == "ok"
    reasons = sorted(r.reason.split(":")[0] for r in out.values() if r.status == "failed")
    assert reasons == ["bad_id", "unresolved"]


def test_ray_tasks_resolve_batches_through_the_runner(tmp_path: Path, service: LookupService, ray_local, make_config):
    folder = write_tfrecords(tmp_path / "yt8m")
    cfg = make_config(tmp_path, [str(folder)], ingest=settings(service, yt8m_lookup_batch=2))
    run_stage("ingest", cfg, progress=False)
    rows = ManifestStore(cfg.run.manifest_root).latest_rows("ingest")
    statuses = Counter((r["status"], r["reason"].split(":")[0]) for r in rows.values())
    assert statuses == Counter({("ok", ""): 3, ("failed", "unresolved"): 3})
    assert len(ManifestStore(cfg.run.manifest_root).read(yt8m.CACHE)) == 5  # every definitive answer


@pytest.mark.parametrize("damage, record, message", [
    ("crc", 1, "record 1: bad CRC of the record data"),
    ("length", 2, "record 2: bad CRC of the record length"),
    ("truncate", 2, "record 2: truncated"),
])
def test_corrupt_tfrecord_names_file_and_record(tmp_path: Path, service: LookupService, damage: str,
                                               record: int, message: str, results):
    folder = write_tfrecords(tmp_path / "yt8m")
    path = folder / "train0000.tfrecord"
    data = bytearray(path.read_bytes())
    offsets = [0]
    while offsets[-1] < len(data):
        offsets.append(offsets[-1] + 16 + int.from_bytes(data[offsets[-1] : offsets[-1] + 8], "little"))
    if damage == "crc":
        data[offsets[1] + 20] ^= 0xFF
    elif damage == "length":
        data[offsets[2]] ^= 0x01
    else:
        data = data[: offsets[2] + 30]
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{path}: {message}"):
        results(tmp_path, [str(path)], **settings(service))
    assert service.total() == 0  # nothing is looked up before every input has been read


def test_labels_by_name_and_unknown_labels(tmp_path: Path, service: LookupService, results):
    folder = write_tfrecords(tmp_path / "yt8m")
    out = results(tmp_path, [str(folder)], **settings(service, yt8m_labels=["vehicle"]))
    assert [r.metrics["yt8m_labels"] for r in out.values()] == [["Vehicle"]]
    with pytest.raises(InputError, match="'Polka' is neither a Name nor a KnowledgeGraphId"):
        results(tmp_path, [str(folder)], **settings(service, yt8m_labels=["Polka"]))
    (folder / "vocabulary.csv").unlink()
    with pytest.raises(InputError, match="set ingest.yt8m_vocabulary"):
        results(tmp_path, [str(folder)], **settings(service))


def test_private_lookup_service_needs_the_explicit_setting(tmp_path: Path, service: LookupService, results):
    folder = write_tfrecords(tmp_path / "yt8m")
    with pytest.raises(ConfigError, match="non-public 127.0.0.1.*yt8m_allow_private_hosts"):
        results(tmp_path, [str(folder)], **settings(service, yt8m_allow_private_hosts=False))
    assert service.total() == 0
