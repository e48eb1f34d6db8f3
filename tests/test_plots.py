"""plots.py and `cli.py plot-embeddings`: a t-SNE map of real embeddings (a tiny random model on samples/) drawn to a
PNG that decodes to the figure's size, speakers kept apart by the map, perplexity clipped for few points, and the
one-line refusals of a missing, corrupt, pickled or incomplete .npz."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from model_helpers import randomise  # noqa: E402

from conv_models import DeepSpeakerModel  # noqa: E402
from embedding import Embedder  # noqa: E402
from plots import EmbeddingSet, EmbeddingsFileError, PlotError, plot_embeddings, read_embeddings, tsne_map  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURE_PIXELS = (450, 630)  # 5 x 7 inches at 90 dpi.


@pytest.fixture(scope='module')
def embeddings_file(librispeech_dir, tmp_path_factory) -> Path:
    """An .npz as `embed` writes it: 3 utterances of each of the 10 sample speakers, embedded by a tiny model."""
    files = [sorted(speaker.glob('*/*.flac'))[:3] for speaker in sorted(librispeech_dir.iterdir())]
    files = [f for group in files for f in group]
    model = DeepSpeakerModel(width=0.125)
    randomise(model.m, seed=7)
    path = tmp_path_factory.mktemp('plots') / 'embeddings.npz'
    np.savez(path, names=np.array([f.stem for f in files]), embeddings=Embedder(model).embed_files(files),
             speakers=np.array([f.parts[-3] for f in files]), fingerprint=np.array('ResCNN width 0.125 (random)'))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'cli.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_read_embeddings_returns_the_arrays(embeddings_file):
    embedding_set = read_embeddings(embeddings_file)
    assert embedding_set.embeddings.shape == (30, 512) and embedding_set.embeddings.dtype == np.float32
    assert len(set(embedding_set.speakers)) == 10 and embedding_set.names[0].startswith(embedding_set.speakers[0])
    assert embedding_set.fingerprint == 'ResCNN width 0.125 (random)'


def test_cli_draws_a_png_of_the_figures_size(embeddings_file, tmp_path):
    out = tmp_path / 'map.png'
    result = run_cli('plot-embeddings', str(embeddings_file), '--out', str(out), '--perplexity', '8')
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 10_000
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == FIGURE_PIXELS and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.05  # not a blank canvas.


def test_map_is_deterministic_and_keeps_same_speaker_points_closer(embeddings_file):
    embedding_set = read_embeddings(embeddings_file)
    points = tsne_map(embedding_set.embeddings, perplexity=8)
    assert points.shape == (30, 2)
    np.testing.assert_array_equal(points, tsne_map(embedding_set.embeddings, perplexity=8))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    same = embedding_set.speakers[:, None] == embedding_set.speakers[None]
    off_diagonal = ~np.eye(30, dtype=bool)
    assert distances[same & off_diagonal].mean() < distances[~same].mean()


def test_few_unlabelled_points_are_drawn_with_the_perplexity_clipped(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    embedding_set = EmbeddingSet(np.array(list('abcd')), vectors, np.array([''] * 4), 'fp')
    plot_embeddings(embedding_set, tmp_path / 'few.png')  # default perplexity 30 > 4 points.
    assert matplotlib.image.imread(tmp_path / 'few.png').shape[:2] == FIGURE_PIXELS
    with pytest.raises(PlotError, match='at least 3'):
        tsne_map(vectors[:2])


def test_bad_files_are_refused_in_one_line(embeddings_file, tmp_path):
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_bytes(embeddings_file.read_bytes()[:500])
    pickled = tmp_path / 'pickled.npz'
    np.savez(pickled, names=np.array(['a', 'b', 'c'], dtype=object), embeddings=np.eye(3, 512),
             speakers=np.array(['x'] * 3), fingerprint=np.array('f'))
    incomplete = tmp_path / 'incomplete.npz'
    np.savez(incomplete, embeddings=np.eye(3, 512))
    mismatched = tmp_path / 'mismatched.npz'
    np.savez(mismatched, names=np.array(['a', 'b']), embeddings=np.eye(3, 512), speakers=np.array(['x'] * 3),
             fingerprint=np.array('f'))
    for path, reason in [(tmp_path / 'none.npz', 'no such file'), (corrupt, 'not a readable .npz'),
                         (pickled, 'not a readable .npz'), (incomplete, 'lacks names, speakers, fingerprint;'),
                         (mismatched, 'do not match 2 names')]:
        with pytest.raises(EmbeddingsFileError, match=reason) as error:
            read_embeddings(path)
        assert str(error.value).startswith(f'{path}: ')
    result = run_cli('plot-embeddings', str(corrupt), '--out', str(tmp_path / 'x.png'))
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f'Error: {corrupt}: not a readable .npz')
    assert not (tmp_path / 'x.png').exists()


@pytest.mark.parametrize('name', ['map.xyz', 'pmap'])
def test_an_out_that_is_not_a_png_is_refused_before_drawing(embeddings_file, tmp_path, name):
    result = run_cli('plot-embeddings', str(embeddings_file), '--out', str(tmp_path / name))
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f'Error: --out {tmp_path / name}: the map is drawn as a PNG; '
                                                      f'give a file name ending in .png.')
    assert list(tmp_path.iterdir()) == []
