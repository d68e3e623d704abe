"""filter stage: frame sampling, the static pre-check, the similarity math, both embedders, weight
loading, failures, and one run through the real runner. Fixtures are made here with ffmpeg."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.media.frames import FrameReader, uniform_indices
from pipeline.media.probe import probe
from pipeline.models.similarity import frame_similarity
from pipeline.models.weights import WeightsNotFound
from pipeline.tools import synth
from stages import load_config_dict
from stages.filter import Filter

SIZE = "160x120"


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, synthetic_media) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("filter_media")
    made = {
        "moving": synthetic_media(d / "moving.mp4", synth.make_video, "moving", duration_s=9, seed=1, size=SIZE),
        "still": synthetic_media(d / "still.mp4", synth.make_video, "still", duration_s=9, seed=2, size=SIZE),
        "slideshow": synthetic_media(d / "slideshow.mp4", synth.make_video, "slideshow", duration_s=9, seed=3, size=SIZE),
        "short": synthetic_media(d / "short.mp4", synth.make_video, "moving", duration_s=1, seed=4, size=SIZE),
        "audio_only": synthetic_media(d / "audio_only.mp4", synth.make_audio_only, duration_s=3),
    }
    # decord cannot open GIFs (no frame count in the metadata): the ffmpeg fallback reads them
    synth.ffmpeg("-i", str(made["moving"]), "-t", "6", str(d / "moving.gif"))
    made["gif"] = d / "moving.gif"
    # 3 s of black, then motion
    synth.ffmpeg(
        "-f", "lavfi", "-i", f"color=black:s={SIZE}:r=25:d=3",
        "-f", "lavfi", "-i", f"testsrc2=s={SIZE}:r=25:d=6",
        "-filter_complex", "[0:v][1:v]concat=n=2:v=1:a=0[v]", "-map", "[v]",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(d / "black_leader.mp4"),
    )
    made["black_leader"] = d / "black_leader.mp4"
    made["corrupt"] = d / "corrupt.mp4"
    made["corrupt"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    return made


def make_stage(tmp_path: Path | None = None, run: dict[str, Any] | None = None, **options: Any) -> Filter:
    raw: dict[str, Any] = {"run": {"weights": "random", **(run or {})}, "filter": options}
    if tmp_path is not None:
        raw["run"].setdefault("models_root", str(tmp_path / "models"))
    cfg = load_config_dict(raw)
    return Filter(cfg.stage("filter"), cfg.run)


def rows_for(videos: dict[str, Path], *names: str) -> list[dict[str, Any]]:
    return [{"key": name, "video_path": str(videos[name])} for name in names]


def by_key(results: list[Any]) -> dict[str, Any]:
    return {r.key: r for r in results}


@pytest.fixture(scope="module")
def pixels_stage() -> Filter:
    stage = make_stage(embedder="pixels")
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def clip_stage() -> Filter:
    # 8 frames keep random-init CLIP on 2 CPU cores quick; the mechanics are those of 16. fp32:
    # the embeddings are compared with open_clip's own encode_image
    stage = make_stage(embedder="clip", frames=8, precision="fp32")
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def clip_run(clip_stage: Filter, videos: dict[str, Path]) -> tuple[dict[str, Any], list[int]]:
    """moving, still and slideshow through random-init CLIP in one batch, and the frames each
    embedder call received."""
    calls: list[int] = []
    embed = clip_stage.embedder.embed

    def counting_embed(frames: list[np.ndarray]) -> np.ndarray:
        calls.append(len(frames))
        return embed(frames)

    clip_stage.embedder.embed = counting_embed  # type: ignore[method-assign]
    try:
        results = by_key(clip_stage.process(rows_for(videos, "moving", "still", "slideshow")))
    finally:
        del clip_stage.embedder.embed
    return results, calls


def _with_config(stage: Filter, **options: Any) -> Filter:
    """The same loaded stage under other options (saves loading CLIP again)."""
    other = make_stage(**{**dataclasses.asdict(stage.config), **options})
    other.embedder, other.identity, other.weights_stamp = stage.embedder, stage.identity, stage.weights_stamp
    return other


# ---------------------------------------------------------------- math and sampling


def direct_similarity(vectors: np.ndarray) -> float:
    n = len(vectors)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                a, b = vectors[i], vectors[j]
                total += float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return total / (n * (n - 1))


def test_frame_similarity_is_the_mean_off_diagonal_cosine() -> None:
    rng = np.random.default_rng(0)
    for n, dim in [(2, 3), (5, 8), (16, 512)]:
        vectors = rng.normal(size=(n, dim))
        assert frame_similarity(vectors) == pytest.approx(direct_similarity(vectors), abs=1e-12)
    # shifted away from the origin: similarities near 1 but not equal to it
    vectors = rng.normal(size=(6, 4)) + 5.0
    assert frame_similarity(vectors) == pytest.approx(direct_similarity(vectors), abs=1e-12)
    assert frame_similarity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_frames_sharing_a_picture_count_as_the_expanded_frames() -> None:
    rng = np.random.default_rng(1)
    pictures = rng.normal(size=(3, 16))
    same_as = np.array([0, 0, 1, 2, 1, 0])
    expanded = pictures[same_as]
    assert frame_similarity(pictures, same_as) == pytest.approx(direct_similarity(expanded), abs=1e-12)
    # a zero feature vector (a flat frame under the pixels embedder) is still identical to itself
    assert frame_similarity(np.zeros((1, 4)), np.array([0, 0, 0])) == 1.0


def test_uniform_indices_cover_the_range() -> None:
    assert uniform_indices(0, 250, 16)[0] == 0
    assert uniform_indices(0, 250, 16)[-1] == 249
    assert len(uniform_indices(0, 250, 16)) == 16
    assert uniform_indices(100, 250, 4) == [100, 150, 199, 249]
    assert uniform_indices(0, 5, 16) == [0, 1, 2, 3, 4]
    assert uniform_indices(7, 7, 16) == []


def test_keyframe_aware_seeking_returns_decords_exact_frames(videos: dict[str, Path]) -> None:
    import decord

    reader = FrameReader(videos["moving"])
    assert reader.decoder == "decord"
    indices = [200, 3, 120, 3, 0, reader.frame_count - 1]  # unsorted, repeated, both ends
    expected = decord.VideoReader(str(videos["moving"])).get_batch(indices).asnumpy()
    frames = reader.read(indices)
    assert len(frames) == len(indices)
    for got, want in zip(frames, expected, strict=True):
        assert np.array_equal(got, want)


def test_ffmpeg_decoder_returns_the_same_frames_as_decord(videos: dict[str, Path]) -> None:
    by_decord = FrameReader(videos["moving"], decoder="decord")
    by_ffmpeg = FrameReader(videos["moving"], decoder="ffmpeg")
    assert by_ffmpeg.decoder == "ffmpeg"
    indices = uniform_indices(0, min(by_decord.frame_count, by_ffmpeg.frame_count), 16)
    for a, b in zip(by_decord.read(indices), by_ffmpeg.read(indices), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_both_decoders_apply_a_display_rotation(videos: dict[str, Path], tmp_path: Path, degrees: int) -> None:
    """Phones store portrait video as landscape plus a rotation flag: filter and features (decord or
    the ffmpeg fallback) must see the picture as displayed, as beats does (ffmpeg)."""
    rotated = synth.make_rotated(videos["moving"], tmp_path / f"rotated{degrees}.mp4", degrees)
    upright = FrameReader(videos["moving"], decoder="decord").read([5])[0]
    turn = probe(rotated).rotation  # ffprobe's display-matrix rotation: degrees counterclockwise
    assert turn % 360 == degrees % 360 or (-turn) % 360 == degrees % 360
    displayed = np.rot90(upright, k=turn // 90)
    for decoder in ("decord", "ffmpeg"):
        assert np.array_equal(FrameReader(rotated, decoder=decoder).read([5])[0], displayed), decoder


# ---------------------------------------------------------------- decisions (pixels embedder)


def test_pixels_embedder_keeps_motion_and_drops_still_and_slideshow(
    pixels_stage: Filter, videos: dict[str, Path]
) -> None:
    results = by_key(pixels_stage.process(rows_for(videos, "moving", "still", "slideshow")))
    moving, still, slideshow = results["moving"], results["still"], results["slideshow"]

    assert moving.status == "ok", moving.reason
    assert moving.metrics["frame_similarity"] < 0.7
    assert moving.metrics["decided_by"] == "embedder"
    assert moving.metrics["frames_scored"] == moving.metrics["embedded_frames"] == 16  # kept: every frame

    assert still.status == "dropped"
    assert still.reason.startswith("static: ")
    assert still.metrics["decided_by"] == "static_precheck"
    assert still.metrics["distinct_frames"] == 1
    assert still.metrics["embedded_frames"] == 0

    assert slideshow.status == "dropped"
    assert slideshow.reason.startswith("similar_frames: ")
    assert slideshow.metrics["frame_similarity"] > 0.7
    assert slideshow.metrics["distinct_frames"] == slideshow.metrics["embedded_frames"] == 2
    assert slideshow.metrics["frames_scored"] == 16  # two pictures, each embedded once, all frames scored

    for result in results.values():
        m = result.metrics
        assert m["frames_read"] == 16
        assert m["decoder"] == "decord"
        assert m["embedder_model"] == "pixels-16x16"
        assert m["weights_sha256"] is None
        assert m["threshold"] == 0.7
    assert pixels_stage.weights_stamp == "none"


@pytest.mark.parametrize("embedder", ["pixels", "clip"])
def test_static_precheck_drops_nothing_the_embedder_would_keep(
    embedder: str, videos: dict[str, Path], pixels_stage: Filter, clip_stage: Filter,
    clip_run: tuple[dict[str, Any], list[int]],
) -> None:
    names = ("moving", "still", "slideshow")
    if embedder == "pixels":
        stage, with_precheck = pixels_stage, by_key(pixels_stage.process(rows_for(videos, *names)))
    else:
        stage, with_precheck = clip_stage, clip_run[0]
    prechecked = [n for n in names if with_precheck[n].metrics["decided_by"] == "static_precheck"]
    assert prechecked == ["still"]
    without = _with_config(stage, identical_frame_tolerance=-1, early_drop_frames=0)
    for name, result in by_key(without.process(rows_for(videos, *prechecked))).items():
        assert result.status == "dropped", f"{name}: the pre-check dropped what {embedder} keeps"
        assert result.metrics["frame_similarity"] > 0.99
        assert result.metrics["distinct_frames"] == result.metrics["frames_read"]


class NearlyConstantEmbedder:
    """Every frame embeds to almost the same vector: any video scores ~1."""

    model_name = "nearly-constant"

    def __init__(self) -> None:
        self.frames_seen = 0

    def embed(self, frames: list[np.ndarray]) -> np.ndarray:
        self.frames_seen += len(frames)
        return np.array([[1.0, float(f.mean()) / 2550] for f in frames])


def test_early_drop_embeds_only_the_most_different_pictures(pixels_stage: Filter, videos: dict[str, Path]) -> None:
    stage = _with_config(pixels_stage)
    stage.embedder = NearlyConstantEmbedder()
    result = stage.process(rows_for(videos, "moving"))[0]
    assert result.status == "dropped"
    assert result.metrics["decided_by"] == "early_drop"
    assert result.metrics["frames_scored"] == result.metrics["embedded_frames"] == 4
    assert stage.embedder.frames_seen == 4
    assert result.metrics["distinct_frames"] == 16
    assert result.reason.startswith("similar_frames: its 4 most different pictures already score")


def test_most_different_pictures_spread_out() -> None:
    from pipeline.models.similarity import SampledVideo, most_different_pictures

    positions = np.array([0.0, 1.0, 2.0, 10.0, 11.0])
    video = SampledVideo(
        key="v", frames=[], decoder="decord", leader_skipped_s=0.0,
        differences=np.abs(positions[:, None] - positions[None, :]), same_as=np.arange(5),
    )
    assert most_different_pictures(video, 2) == [0, 4]
    assert most_different_pictures(video, 3) == [0, 2, 4]
    video.same_as = np.array([0, 0, 0, 3, 3])  # two pictures: both, whatever k
    assert most_different_pictures(video, 4) == [0, 3]


# ---------------------------------------------------------------- CLIP (random weights: mechanics)


def test_random_clip_is_stamped_and_batched_across_videos(
    clip_stage: Filter, clip_run: tuple[dict[str, Any], list[int]]
) -> None:
    results, calls = clip_run
    assert clip_stage.weights_stamp == "random-init"
    # one early round for all videos together, at most one more for the undecided ones; the still
    # video never reaches the embedder and the slideshow's two pictures are embedded once each
    assert 1 <= len(calls) <= 2
    assert sum(calls) == sum(r.metrics["embedded_frames"] for r in results.values())
    assert results["still"].metrics["embedded_frames"] == 0
    assert results["slideshow"].metrics["embedded_frames"] == 2
    for result in results.values():
        m = result.metrics
        assert m["embedder_model"] == "ViT-B-32"
        assert m["weights_sha256"] is None
        assert -1.0 <= m["frame_similarity"] <= 1.0
        assert m["frames_scored"] == (4 if m["decided_by"] == "early_drop" else 8)
        assert (result.status == "ok") == (m["frame_similarity"] <= 0.7)


def test_clip_embeddings_match_open_clip_encode_image(clip_stage: Filter, videos: dict[str, Path]) -> None:
    """Same seed → same random weights on every worker; image tower + preprocessing = encode_image."""
    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    preprocess = open_clip.image_transform(224, is_train=False)
    reader = FrameReader(videos["moving"])
    frames = reader.read(uniform_indices(0, reader.frame_count, 4))
    with torch.inference_mode():
        reference = model.encode_image(torch.stack([preprocess(Image.fromarray(f)) for f in frames]))
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    assert np.allclose(clip_stage.embedder.embed(frames), reference, atol=1e-4)
    scored = _with_config(clip_stage, frames=4, early_drop_frames=0).process(rows_for(videos, "moving"))[0]
    assert scored.metrics["frames_scored"] == 4
    assert scored.metrics["frame_similarity"] == pytest.approx(frame_similarity(reference), abs=1e-4)



def test_large_frames_are_shrunk_at_decode_without_changing_clip_embeddings(clip_stage: Filter) -> None:
    """4K frames are resized to CLIP's input side as they are decoded (bounded memory), with the
    size and filter CLIP's preprocessing uses: the embeddings are bit-identical."""
    from pipeline.models.similarity import shrink_to_short_side

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8), rng.integers(0, 256, (720, 400, 3), dtype=np.uint8)]
    shrunk = [shrink_to_short_side(f, 224) for f in frames]
    assert [f.shape for f in shrunk] == [(224, 398, 3), (403, 224, 3)]
    assert np.array_equal(clip_stage.embedder.embed(frames), clip_stage.embedder.embed(shrunk))
    small = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert shrink_to_short_side(small, 224) is small

def test_precision_auto_is_bf16_only_on_native_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pipeline.models.precision import choose_precision, native_bf16

    assert choose_precision("auto", native_bf16=True) == "bf16"
    assert choose_precision("auto", native_bf16=False) == "fp32"
    assert choose_precision("fp32", native_bf16=True) == "fp32"
    assert choose_precision("bf16", native_bf16=False) == "bf16"  # asked for explicitly: honoured
    # a CPU without AVX512-BF16 and AMX (oneDNN could still emulate bf16, slowly): fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16("cpu") is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert native_bf16("cpu") is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert native_bf16("cpu") is False
    with pytest.raises(ValueError, match="filter.precision"):
        make_stage(precision="fp16")
    assert make_stage(precision="fp32").params() != make_stage(precision="bf16").params()
    assert make_stage(embedder="pixels", precision="fp32").params() == make_stage(embedder="pixels").params()


def test_bf16_clip_scores_like_fp32_and_is_stamped(clip_stage: Filter, videos: dict[str, Path]) -> None:
    """Same random weights in bf16: embeddings (returned as float32) within cosine 0.999 of fp32,
    frame_similarity within 0.005 (measured here: cosine ≥ 0.9999, |Δ| ≤ 1e-4)."""
    bf16 = make_stage(embedder="clip", frames=8, precision="bf16")
    bf16.setup()
    assert bf16.identity["precision"] == "bf16" and clip_stage.identity["precision"] == "fp32"
    for name in ("moving", "slideshow"):
        reader = FrameReader(videos[name])
        frames = reader.read(uniform_indices(0, reader.frame_count, 6))
        full, half = clip_stage.embedder.embed(frames), bf16.embedder.embed(frames)
        assert half.dtype == np.float32
        assert (full * half).sum(axis=1).min() >= 0.999
        assert frame_similarity(half) == pytest.approx(frame_similarity(full), abs=0.005)
    result = bf16.process(rows_for(videos, "slideshow"))[0]
    assert result.metrics["precision"] == "bf16"


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("filename,via", [("open_clip_pytorch_model.bin", "models_root"), ("open_clip_model.safetensors", "env")])
def test_pretrained_weights_load_from_the_models_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filename: str, via: str
) -> None:
    import open_clip
    import torch

    torch.manual_seed(123)  # not the random-init seed: loading must change the weights
    source = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    folder = tmp_path / "models" / "open_clip" / "ViT-S-32-alt-localtest"
    folder.mkdir(parents=True)
    checkpoint = folder / filename
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(checkpoint))
    else:
        torch.save(source.state_dict(), checkpoint)
    if via == "env":
        monkeypatch.setenv("DISCOMV_MODELS", str(tmp_path / "models"))
        run = {"weights": "pretrained", "models_root": "does-not-exist"}
    else:
        run = {"weights": "pretrained", "models_root": str(tmp_path / "models")}

    # fp32: the loaded weights are compared bit for bit with the saved ones
    stage = make_stage(run=run, embedder="clip", model="ViT-S-32-alt", pretrained="localtest", precision="fp32")
    stage.setup()
    assert stage.weights_stamp == "pretrained"
    assert stage.identity["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert stage.identity["embedder_model"] == "ViT-S-32-alt/localtest"
    loaded = stage.embedder.visual.state_dict()
    for name, tensor in source.visual.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_pretrained_without_weights_fails_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCOMV_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("DISCOMV_MODELS", raising=False)
    stage = make_stage(tmp_path, run={"weights": "pretrained"}, embedder="clip")
    with pytest.raises(WeightsNotFound, match="open_clip/ViT-B-32-laion2b_s34b_b79k"):
        stage.setup()


# ---------------------------------------------------------------- failures and options


def test_bad_files_fail_with_a_reason_and_the_batch_goes_on(pixels_stage: Filter, videos: dict[str, Path]) -> None:
    rows = rows_for(videos, "corrupt", "short", "audio_only", "moving")
    rows.append({"key": "missing", "video_path": str(videos["moving"].with_name("gone.mp4"))})
    results = by_key(pixels_stage.process(rows))
    assert results["corrupt"].status == "failed"
    assert results["corrupt"].reason.startswith("unreadable: decord: ")
    assert "ffmpeg" in results["corrupt"].reason
    assert results["short"].status == "failed"
    assert results["short"].reason.startswith("too_short: 0.96s (24 frames) < filter.min_duration_s=2s")
    assert results["audio_only"].status == "failed"
    assert results["audio_only"].reason.startswith("no_video_stream: ")
    assert results["missing"].reason.startswith("missing_file: ")
    assert results["moving"].status == "ok"
    assert results["corrupt"].metrics["embedder_model"] == "pixels-16x16"


def test_files_decord_cannot_read_fall_back_to_ffmpeg(pixels_stage: Filter, videos: dict[str, Path]) -> None:
    result = pixels_stage.process(rows_for(videos, "gif"))[0]
    assert result.metrics["decoder"] == "ffmpeg"
    assert result.status == "ok", result.reason
    assert result.metrics["frames_read"] == 16


def test_blank_leader_is_skipped_only_when_configured(videos: dict[str, Path]) -> None:
    rows = rows_for(videos, "black_leader")
    plain = make_stage(embedder="pixels")
    plain.setup()
    skipping = make_stage(embedder="pixels", skip_blank_leader=True)
    skipping.setup()
    kept = plain.sample(rows[0])
    skipped = skipping.sample(rows[0])
    assert kept.leader_skipped_s == 0.0
    assert kept.frames[0].max() < 20  # a black first frame
    assert 2.5 <= skipped.leader_skipped_s <= 3.5
    assert min(f.std() for f in skipped.frames) > 10  # no blank frame left
    assert len(skipped.frames) >= 14


def test_config_is_validated_and_sizes_the_workers() -> None:
    with pytest.raises(ValueError, match="filter.embedder"):
        make_stage(embedder="siglip")
    with pytest.raises(ValueError, match="filter.early_drop_frames"):
        make_stage(frames=8, early_drop_frames=8)
    with pytest.raises(ValueError, match="filter.decode_cpus"):
        make_stage(decode_cpus=-1)
    stage = make_stage(num_gpus=1, batch_size=32, concurrency=3)
    assert (stage.resources.num_gpus, stage.resources.batch_size, stage.resources.concurrency) == (1, 32, 3)
    assert make_stage(embedder="pixels").params() != make_stage(embedder="clip").params()
    # decode in CPU tasks upstream of GPU actors by default; inside the actors on CPU-only runs
    assert stage.resources.prepare_cpus == 1.0
    assert make_stage().resources.prepare_cpus is None
    assert make_stage(decode_cpus=0.5).resources.prepare_cpus == 0.5
    assert make_stage(num_gpus=1, decode_cpus=0).resources.prepare_cpus is None


def test_prepared_rows_give_the_same_results_as_direct_calls(pixels_stage: Filter, videos: dict[str, Path]) -> None:
    from stages.filter import DECODED, FRAMES

    rows = rows_for(videos, "moving", "still", "slideshow", "corrupt")
    rows.append({"key": "missing", "video_path": str(videos["moving"].with_name("gone.mp4"))})
    prepared = pixels_stage.prepare(rows)
    assert [r["key"] for r in prepared] == [r["key"] for r in rows]
    assert prepared[0][FRAMES].shape == (16, 120, 160, 3) and prepared[0][FRAMES].dtype == np.uint8
    assert prepared[0][DECODED] == {"decoder": "decord", "leader_skipped_s": 0.0, "failure": None}
    assert prepared[3][FRAMES].shape == (0, 0, 0, 3) and prepared[3][DECODED]["failure"].startswith("unreadable: ")
    direct = by_key(pixels_stage.process(rows))
    # a mix of prepared and un-prepared rows, as when a prepare task gave up on some of them
    mixed = by_key(pixels_stage.process(prepared[:2] + rows[2:]))
    for results in (by_key(pixels_stage.process(prepared)), mixed):
        assert set(results) == set(direct)
        for key, result in results.items():
            assert (result.status, result.reason, result.metrics) == (direct[key].status, direct[key].reason,
                                                                     direct[key].metrics), key
    assert direct["corrupt"].status == direct["missing"].status == "failed"
    assert direct["missing"].reason.startswith("missing_file: ")


# ---------------------------------------------------------------- through the runner


def test_filter_runs_after_ingest_and_download_through_the_runner(tmp_path: Path, videos: dict[str, Path]) -> None:
    from pipeline.manifest import ManifestStore
    from pipeline.runner import ensure_ray, run_stage
    from pipeline.tools.localserver import LocalServer

    ensure_ray(2)
    names = ("moving", "still", "slideshow")
    with LocalServer(videos["moving"].parent) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{server.url}/{videos[n].name}\n" for n in names))
        raw = {
            "run": {
                "manifest_root": str(tmp_path / "manifests"),
                "media_root": str(tmp_path / "media"),
                "weights": "random",
                "models_root": str(tmp_path / "models"),
            },
            "ingest": {"inputs": [f"urls={urls}"]},
            "download": {"allow_private_hosts": True, "concurrency": 1, "retries": 0},
            "filter": {"embedder": "clip", "frames": 8, "concurrency": 1, "batch_size": 4},
        }
        cfg = load_config_dict(raw)
        run_stage("ingest", cfg, progress=False)
        assert run_stage("download", cfg, progress=False).statuses["ok"] == 3
    store = ManifestStore(cfg.run.manifest_root)

    summary = run_stage("filter", cfg, progress=False)
    assert summary.processed == 3
    table = store.latest("filter")
    assert set(Filter.schema.names) <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["weights"] for r in rows} == {"random-init"}
    assert {r["embedder_model"] for r in rows} == {"ViT-B-32"}
    assert all(r["frame_similarity"] is not None and r["frames_read"] == 8 for r in rows)

    raw["filter"]["embedder"] = "pixels"  # new params: every row is redone
    run_stage("filter", load_config_dict(raw), progress=False)
    rows = _by_source_name(store)
    assert {r["weights"] for r in rows.values()} == {"none"}
    assert {r["embedder_model"] for r in rows.values()} == {"pixels-16x16"}
    assert rows["moving.mp4"]["status"] == "ok"
    assert rows["still.mp4"]["status"] == "dropped" and rows["still.mp4"]["reason"].startswith("static: ")
    assert rows["slideshow.mp4"]["status"] == "dropped"


def _by_source_name(store: Any) -> dict[str, dict[str, Any]]:
    """Latest filter rows keyed by the file name in their ingest URL."""
    urls = {key: row["url"] for key, row in store.latest_rows("ingest").items()}
    return {urls[r["key"]].rsplit("/", 1)[-1]: r for r in store.latest("filter").to_pylist()}
