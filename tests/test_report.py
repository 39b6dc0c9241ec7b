"""Report files: figures are written atomically with plain file modes."""

from __future__ import annotations

import stat

import pytest

from mpq_jax.report import save_figure


def test_save_figure_writes_a_png_with_umask_mode(tmp_path, umask_022):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "layer_error.png")
    path = tmp_path / "layer_error.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["layer_error.png"]
    assert not plt.fignum_exists(fig.number)


def test_failed_save_figure_leaves_nothing_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots(figsize=(2, 2))

    def dies_half_way(path, **kwargs):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = dies_half_way
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "amlq_delta.png")
    assert list(tmp_path.iterdir()) == []
    assert not plt.fignum_exists(fig.number)
