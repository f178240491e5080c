"""The shared helpers: image grids, progress lines, the free port, usable cores."""

import socket

import numpy as np

from pipeline.core.grid import image_grid
from pipeline.core.progress import Progress


def test_image_grid_tiles_with_gutters():
    images = np.stack([np.full((4, 6, 3), i, np.uint8) for i in range(5)])
    grid = image_grid(images)  # 5 images: 3 columns, 2 rows
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert (grid[2:6, 2:8] == 0).all() and (grid[8:12, 10:16] == 4).all()
    assert (grid[:2] == 255).all() and (grid[8:12, 18:24] == 255).all()  # gutter, and the empty sixth cell
    assert image_grid(images, columns=5, pad=0).shape == (4, 30, 3)


def test_preview_grid_is_the_same_grid():
    from pipeline.train.previews import to_grid

    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 4, 4))
    pixels = np.round((x + 1.0) * 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1).repeat(3, axis=-1)
    assert np.array_equal(np.asarray(to_grid(x)), image_grid(pixels))


def test_progress_without_a_terminal_logs_lines(capsys):
    progress = Progress(3, lambda p: f"done {p.done}/{p.total} {p.text}", interval=3600)
    progress.describe("phase")
    progress.update()
    progress()
    assert capsys.readouterr().err == ""  # within the interval: quiet
    progress.update()
    assert capsys.readouterr().err == "done 3/3 phase\n"  # the last unit is always told
    assert progress.close() >= 0 and progress.rate > 0
    quiet = Progress(1, lambda p: "never", quiet=True)
    quiet.update()
    assert capsys.readouterr().err == ""


def test_free_port_is_bindable_and_cores_are_counted():
    from export.backends import default_threads
    from pipeline.train.distributed import free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
    assert default_threads() >= 1
