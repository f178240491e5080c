"""data_prep on a corpus of good and deliberately broken images, run as the real CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def run_prep(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"data_prep {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(rng, w, h) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_corpus(root: Path) -> tuple[set[str], dict[str, str]]:
    """Write good and bad images under root: (names that must land, {name: expected skip reason})."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for i in range(40):  # plain good images, mixed formats and aspect ratios
        w, h = int(rng.integers(32, 72)), int(rng.integers(32, 72))
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        files[f"imgs/sub{i % 2}/good_{i:03d}.{ext}"] = encode(noise(rng, w, h), fmt)
    red = Image.new("RGB", (48, 48), (220, 20, 30))
    files["special/cmyk.jpg"] = encode(red.convert("CMYK"), "JPEG", quality=95)
    files["special/grey16.png"] = encode(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG")
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.paste(1, (10, 10, 30, 30))
    files["special/palette_transparent.png"] = encode(pal, "PNG", transparency=0)
    rotated = Image.new("RGB", (64, 48), (20, 20, 230))  # stored: top half red, bottom half blue
    rotated.paste((230, 20, 20), (0, 0, 64, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the red top becomes the right side
    files["special/exif_rotated.jpg"] = encode(rotated, "JPEG", exif=exif.tobytes(), quality=95)
    good = set(files)

    bad = {
        "bad/truncated.jpg": "truncated",
        "bad/zero.jpg": "zero bytes",
        "bad/text.jpg": "not an image",
        "bad/tiny.png": "too small (20x20 < 32)",
    }
    files["bad/truncated.jpg"] = encode(noise(rng, 64, 64), "JPEG")[:1500]
    files["bad/zero.jpg"] = b""
    files["bad/text.jpg"] = b"this is not a picture\n"
    files["bad/tiny.png"] = encode(noise(rng, 20, 20), "PNG")
    files["README.txt"] = b"not an input: wrong extension"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return good, bad


def read_shards(out: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """{source name: (json meta, decoded image)} over every shard in the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                if name.endswith(".json"):
                    meta = json.loads(data)
                    image = np.asarray(Image.open(io.BytesIO(members[name[:-5] + "." + manifest["image_format"]])))
                    assert meta["source"] not in found, f"{meta['source']} appears twice"
                    found[meta["source"]] = (meta, image)
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good, bad = make_corpus(root / "images")
    return root / "images", good, bad


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    src, good, bad = corpus
    out = tmp_path_factory.mktemp("shards") / "w1"
    run_prep("--src", src, "--out", out, "--size", SIZE, "--workers", 1, "--shard-size", 16, "--val-fraction", 0.2)
    return out


def test_every_good_image_lands_once_and_every_bad_one_is_listed(corpus, prepared):
    src, good, bad = corpus
    found = read_shards(prepared)
    assert set(found) == good
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert {s["file"]: s["reason"] for s in manifest["skipped"]} == bad
    assert manifest["totals"]["num_samples"] == len(good) and manifest["totals"]["num_skipped"] == len(bad)
    assert manifest["resolution"] == SIZE and manifest["image_format"] == "png"
    assert manifest["splits"]["val"]["num_samples"] > 0 and manifest["splits"]["train"]["num_samples"] > 0
    for meta, image in found.values():
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_modes_and_orientation_are_converted(prepared):
    found = read_shards(prepared)
    meta, exif_img = found["special/exif_rotated.jpg"]
    assert meta["orig_size"] == [48, 64]  # width and height as displayed, after the EXIF rotation
    left, right = exif_img[:, :8].mean(axis=(0, 1)), exif_img[:, -8:].mean(axis=(0, 1))
    assert left[2] > 180 and left[0] < 80, left  # blue on the left
    assert right[0] > 180 and right[2] < 80, right  # red on the right
    cmyk = found["special/cmyk.jpg"][1].mean(axis=(0, 1))
    assert cmyk[0] > 180 and cmyk[1] < 70 and cmyk[2] < 70, cmyk
    grey = found["special/grey16.png"][1]
    assert abs(int(grey.mean()) - 156) <= 2  # 40000 / 257, not clipped to 255
    pal = found["special/palette_transparent.png"][1]
    assert (pal[0, 0] == 255).all()  # transparent corner composited on white
    assert pal[16, 16][1] > 150 and pal[16, 16][0] < 80  # the opaque green square


def test_split_is_a_function_of_the_name(corpus, prepared):
    from data_prep.build import split_of

    manifest = json.loads((prepared / "manifest.json").read_text())
    for name, (meta, _) in read_shards(prepared).items():
        assert meta["split"] == split_of(name, seed=0, val_fraction=0.2)[0]
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["val"]["num_samples"] == 44


def test_workers_do_not_change_a_byte(corpus, prepared, tmp_path):
    src, _, _ = corpus
    out = tmp_path / "w2"
    run_prep("--src", src, "--out", out, "--size", SIZE, "--workers", 2, "--shard-size", 16, "--val-fraction", 0.2)
    one = json.loads((prepared / "manifest.json").read_text())["splits"]
    two = json.loads((out / "manifest.json").read_text())["splits"]
    assert one == two and len(one["train"]["shards"]) >= 2
    for split in two.values():
        for entry in split["shards"]:
            assert (out / entry["name"]).read_bytes() == (prepared / entry["name"]).read_bytes()


def test_zip_source_gives_the_same_shards(corpus, prepared, tmp_path):
    src, good, bad = corpus
    archive = tmp_path / "celeba.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(src).as_posix())
        zf.writestr("__MACOSX/imgs/._good_000.jpg", b"resource fork")
    out = tmp_path / "from_zip"
    run_prep("--src", archive, "--out", out, "--size", SIZE, "--workers", 2, "--shard-size", 16, "--val-fraction", 0.2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "zip"
    assert {s["file"]: s["reason"] for s in manifest["skipped"]} == bad
    assert manifest["splits"] == json.loads((prepared / "manifest.json").read_text())["splits"]


def test_rerun_is_a_no_op_and_verify_finds_damage(prepared, tmp_path, corpus):
    src, _, _ = corpus
    again = run_prep(
        "--src", src, "--out", prepared, "--size", SIZE, "--workers", 1, "--shard-size", 16, "--val-fraction", 0.2
    )
    assert "nothing to do" in again.stderr
    assert run_prep("--verify", prepared).returncode == 0

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in prepared.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    shard = damaged / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_prep("--verify", damaged, check=False)
    assert proc.returncode == 1 and "train-000001.tar" in proc.stderr and "sha256" in proc.stderr


def test_kill_and_resume_gives_the_clean_shards(tmp_path):
    args = ["--synthetic", 1500, "--size", 32, "--shard-size", 50, "--val-fraction", 0.02]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *map(str, args), "--out", killed, "--workers", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (killed / "train-000004.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "data_prep ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before the kill; the test proves nothing"
    first = (killed / "train-000000.tar").stat()

    run_prep(*args, "--out", killed, "--workers", 2)
    clean = tmp_path / "clean"
    run_prep(*args, "--out", clean, "--workers", 1)
    a = json.loads((killed / "manifest.json").read_text())
    b = json.loads((clean / "manifest.json").read_text())
    assert a["splits"] == b["splits"] and a["totals"]["num_samples"] == 1500
    assert (killed / "train-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # kept, not rewritten
    assert not list(killed.glob(".*")), "temporary or journal files left behind"
    for split in a["splits"].values():
        for entry in split["shards"]:
            assert (killed / entry["name"]).read_bytes() == (clean / entry["name"]).read_bytes()


def test_synthetic_faces_are_deterministic_and_varied():
    from data_prep.synthetic import draw_face

    a, b = np.asarray(draw_face(0, 7, 32)), np.asarray(draw_face(0, 7, 32))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    faces = np.stack([np.asarray(draw_face(0, i, 32), dtype=np.float32) for i in range(16)])
    assert faces.std(axis=0).mean() > 20  # faces differ from one another
    # the centre (the face) differs in colour from the corners (the backdrop) on average
    centre, corner = faces[:, 12:20, 12:20].mean(axis=(1, 2)), faces[:, :4, :4].mean(axis=(1, 2))
    assert np.abs(centre - corner).sum(axis=1).mean() > 30


def test_synthetic_grayscale_has_three_equal_channels(tmp_path):
    run_prep("--synthetic", 12, "--grayscale", "--size", SIZE, "--out", tmp_path / "gray", "--workers", 1)
    manifest = json.loads((tmp_path / "gray" / "manifest.json").read_text())
    assert manifest["source"]["grayscale"] is True
    faces = []
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            with tarfile.open(tmp_path / "gray" / entry["name"]) as tar:
                faces += [
                    np.asarray(Image.open(tar.extractfile(m)).convert("RGB"), dtype=np.int16)
                    for m in tar.getmembers()
                    if m.name.endswith(".png")
                ]
    assert len(faces) == 12
    for face in faces:
        assert np.array_equal(face[..., 0], face[..., 1]) and np.array_equal(face[..., 1], face[..., 2])
        assert face.std() > 10  # still a face, not a flat grey
    from data_prep.synthetic import draw_face  # the same face as the colour set, its luma

    luma = np.asarray(draw_face(0, 3, SIZE).convert("L"))
    assert np.array_equal(np.asarray(draw_face(0, 3, SIZE, grayscale=True))[..., 0], luma)


@pytest.mark.parametrize(
    "args, expect",
    [
        ([], "one of --src, --synthetic or --verify is required"),
        (["--src", "x", "--out", "y", "--grayscale"], "--grayscale: only with --synthetic"),
        (["--src", "/nonexistent/celeba", "--out", "x"], "/nonexistent/celeba: no such file or directory"),
        (["--synthetic", "4", "--out", "x", "--format", "gif"], "--format: invalid choice: 'gif'"),
        (["--synthetic", "4"], "--out is required"),
        (["--synthetic", "4", "--out", "x", "--val-fraction", "1.5"], "--val-fraction 1.5: must be in [0, 1)"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, expect, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr


def test_src_that_is_neither_folder_nor_zip(tmp_path):
    (tmp_path / "list.txt").write_text("00001.jpg\n")
    proc = run_prep("--src", tmp_path / "list.txt", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("list.txt: not a folder or a .zip archive")
    assert not (tmp_path / "out").exists()


def test_different_settings_refuse_to_mix(prepared, corpus):
    src, _, _ = corpus
    proc = run_prep(
        "--src", src, "--out", prepared, "--size", 48, "--shard-size", 16, "--val-fraction", 0.2, check=False
    )
    assert proc.returncode == 2 and "resolution: 32 -> 48" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_data_prep_writes_what_pipeline_reads(tmp_path):
    """data_prep writes the shard contract pipeline reads; the names, versions, image types and hashes agree."""
    from data_prep import images, shards
    from pipeline.core import fileio, manifest

    assert shards.MANIFEST_NAME == manifest.MANIFEST_NAME
    assert shards.FORMAT_VERSION in manifest.SUPPORTED_FORMAT_VERSIONS
    assert set(images.FORMATS) <= set(manifest.IMAGE_EXTENSIONS)
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20))
    assert shards.sha256_file(blob) == fileio.sha256_file(blob)


def test_data_prep_atomic_writer_behaves_like_pipelines(tmp_path):
    """data_prep writes its manifest and journal through pipeline.core.fileio (one writer, no drifted copy):
    same permissions as a plain file, nothing left behind by a failed write."""
    from data_prep import build
    from pipeline.core import fileio

    assert build.atomic_write_bytes is fileio.atomic_write_bytes
    umask = os.umask(0)
    os.umask(umask)
    for name, write in (("data_prep", build.atomic_write_bytes), ("pipeline", fileio.atomic_write_bytes)):
        folder = tmp_path / name
        folder.mkdir()
        write(folder / "f.bin", b"whole")
        assert (folder / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask, name
        with pytest.raises(TypeError):
            write(folder / "f.bin", "not bytes")  # fails inside the write, after the temporary exists
        assert [p.name for p in folder.iterdir()] == ["f.bin"], name
        assert (folder / "f.bin").read_bytes() == b"whole", name
