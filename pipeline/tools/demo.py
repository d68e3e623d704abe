"""`discomv demo`: an offline end-to-end run on synthetic music videos served from 127.0.0.1.

It makes the corpus with ffmpeg (moving scenes, a looped still, a near-identical slideshow, music
with a synthetic voice), a few broken entries (404, an HTML page, a truncated file, audio only, an
ftp:// URL), lists them in a DISCO-10M-style Parquet, a URL list and a YouTube-8M-style TFRecord
(its pseudo ids resolved through a lookup service that the same server stands in for), and runs every
registered stage with real yt-dlp against the local server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.tools import synth
from pipeline.tools.localserver import LocalServer

log = logging.getLogger("discomv")
DEMO_PORT = 18765

# Per-stage settings of the offline demo; only sections of registered stages are written.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "download": {"allow_private_hosts": True, "retries": 1, "backoff_s": 0.2, "concurrency": 2},
    "filter": {"embedder": "pixels"},
    # One probe and one residual segment instead of three: the real htdemucs architecture on 2 CPU
    # cores takes ~10 s per 7.8 s segment, and the demo must finish in minutes.
    "separate": {"probe_segments": 1, "residual_segments": 1},
}
# The small test architectures through the same code paths, for tests, load runs and `e2e --fast`:
# never for data (outputs are stamped random-init like any random weights).
SMALL_MODELS: dict[str, dict[str, Any]] = {
    "filter": {"embedder": "pixels"},
    "separate": {"random_init": "tiny8k", "probe_segments": 1, "residual_segments": 1},
    "tokens": {"model": "encodec_32khz_test"},
    "features": {"model": "hiera_test_16x224"},
}
TRAIN_STEPS = 20


def make_corpus(source_dir: Path, n_videos: int, duration_s: float = 20.0) -> list[dict[str, Any]]:
    """Videos and broken files under `source_dir`; returns (relative path, kind, title) entries."""
    source_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_videos):
        kind = synth.KINDS[i % len(synth.KINDS)]
        path = source_dir / f"mv{i:03d}_{kind}.mp4"
        _make_video(path, kind, duration_s, seed=i)
        entries.append({"file": path.name, "kind": kind, "title": f"Synthetic {kind} music video #{i}"})
    broken = {
        "truncated.mp4": lambda p: synth.make_truncated(source_dir / entries[0]["file"], p),
        "audio_only.mp4": synth.make_audio_only,
        "video_only.mp4": synth.make_video_only,
    }
    for name, make in broken.items():
        if not (source_dir / name).exists():
            make(source_dir / name)
        entries.append({"file": name, "kind": name.removesuffix(".mp4"), "title": f"Broken: {name}"})
    (source_dir / "page.html").write_text("<html><body><h1>Not a video</h1></body></html>\n")
    entries.append({"file": "page.html", "kind": "html", "title": "An HTML page"})
    entries.append({"file": "status/404/gone.mp4", "kind": "404", "title": "A removed video"})
    return entries


def _make_video(path: Path, kind: str, duration_s: float, seed: int) -> None:
    """A synthetic video at `path` unless one is there (made under a temporary name, then renamed)."""
    if not path.exists():
        tmp = path.with_name("tmp_" + path.name)
        synth.make_video(tmp, kind, duration_s, seed=seed)
        tmp.with_suffix(".voice.wav").unlink(missing_ok=True)
        tmp.rename(path)


def write_disco_parquet(path: Path, base_url: str, entries: list[dict[str, Any]]) -> Path:
    """A table with DISCO-10M's published column names (values synthetic)."""
    n = len(entries)
    table = pa.table({
        "video_url_youtube": [f"{base_url}/{e['file']}" for e in entries],
        "video_title_youtube": [e["title"] for e in entries],
        "video_duration_youtube_sec": [20.0] * n,
        "track_name_spotify": [f"Track {i}" for i in range(n)],
        "primary_artist_name_spotify": [f"Artist {i % 5}" for i in range(n)],
        "artist_id_spotify": [[f"artist{i % 5:03d}"] for i in range(n)],
        "track_id_spotify": [f"track{i:05d}" for i in range(n)],
        "similarity_duration": [0.9] * n,
        "similarity_audio": [0.8] * n,
        "preview_url_spotify": [None] * n,
    })
    pq.write_table(table, path)
    return path


# YouTube-8M-style records: pseudo id → (labels, YouTube id the lookup service answers, or None: a 404)
YT8M_VOCABULARY = "Index,TrainVideoCount,KnowledgeGraphId,Name\n0,116043,/m/0mdxd,Music video\n1,200813,/m/07yv9,Vehicle\n"
YT8M_RECORDS = {"Yt01": ([0], "demoYT8Mv01"), "Yt02": ([1], "demoYT8Mv02"), "Yt03": ([0], None)}


def write_yt8m(folder: Path, source_dir: Path, base_url: str, n_videos: int) -> dict[str, Any]:
    """A video-level TFRecord + vocabulary.csv (one music video that resolves, one vehicle video that
    is never a candidate, one music video the lookup service doesn't know), the lookup service's
    JSONP as static files and the resolved video under source/yt8m/; returns the ingest settings."""
    from tfrecord.writer import TFRecordWriter

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.csv").write_text(YT8M_VOCABULARY)
    writer = TFRecordWriter(str(folder / "train0000.tfrecord"))
    for pseudo, (labels, youtube_id) in YT8M_RECORDS.items():
        writer.write({"id": (pseudo.encode(), "byte"), "labels": (labels, "int"),
                      "mean_rgb": ([0.5] * 1024, "float"), "mean_audio": ([0.5] * 128, "float")})
        if youtube_id:
            answer = source_dir / "yt8m-lookup" / "2" / "j" / "i" / pseudo[:2] / f"{pseudo}.js"
            answer.parent.mkdir(parents=True, exist_ok=True)
            answer.write_text(f'i("{pseudo}","{youtube_id}");\n')
    writer.close()
    (source_dir / "yt8m").mkdir(exist_ok=True)  # the music video; a moving one passes the filter
    _make_video(source_dir / "yt8m" / "demoYT8Mv01.mp4", "moving", 20.0, seed=n_videos)
    return {"yt8m_lookup_url": f"{base_url}/yt8m-lookup", "yt8m_allow_private_hosts": True,
            "yt8m_video_url": f"{base_url}/yt8m/{{id}}.mp4"}


def write_config(work: Path, inputs: list[str], ingest: dict[str, Any] | None = None) -> Path:
    from stages import STAGES

    config: dict[str, Any] = {
        "run": {
            "manifest_root": str(work / "manifests"),
            "media_root": str(work / "media"),
            "shard_root": str(work / "shards"),
            "weights": "random",
            "keep_media": ["video", "stems"],  # `discomv browse` plays each clip's video and instrumental
        },
        "ingest": {"inputs": inputs, **(ingest or {})},
    }
    config.update({name: s for name, s in DEMO_SETTINGS.items() if name in STAGES})
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(out: str, n_videos: int = 8, progress: bool = True, port: int = DEMO_PORT) -> Path:
    """Every stage over a synthetic corpus served from 127.0.0.1; returns the demo's config file
    (the command line then verifies, trains and audits, as a user would)."""
    from pipeline.stream import run_pipeline
    from pipeline.tools.summary import print_run, print_status
    from stages import STAGES, load_config

    work = Path(out).resolve()
    log.info("demo: making %d synthetic music videos in %s", n_videos, work / "source")
    entries = make_corpus(work / "source", n_videos)
    # A fixed port keeps URLs, and so keys, stable across demo re-runs (a re-run does nothing).
    with LocalServer(work / "source", port=port) as server:
        parquet = write_disco_parquet(work / "disco10m_demo.parquet", server.url, entries)
        urls = work / "urls.txt"
        urls.write_text(f"{server.url}/{entries[1]['file']}\nftp://example.org/song.mp4\n")
        yt8m = write_yt8m(work / "yt8m", work / "source", server.url, n_videos)
        config_path = write_config(work, [f"disco10m={parquet}", f"urls={urls}", f"yt8m={work / 'yt8m'}"], yt8m)
        cfg = load_config(config_path)
        log.info("demo: serving %s on %s; config %s", work / "source", server.url, config_path)
        summaries = run_pipeline(list(STAGES), cfg, progress=progress)
    print_status(cfg)
    print_run(summaries)
    return config_path
