"""export.py and `cli.py export`: the exported SavedModel and the TFLite interpreter give the Python encoder's
embeddings (embedding.Embedder) on the sample files, from raw untrimmed PCM; audio the encoder refuses gives a zero
vector; the in-graph silence threshold equals numpy's percentile rule; an existing directory is refused without
--overwrite and replaced whole with it; the GRU is refused for TFLite."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from model_helpers import randomise  # noqa: E402

from constants import SILENCE_PERCENTILE  # noqa: E402
from conv_models import DeepSpeakerModel, GruModel, TdnnModel  # noqa: E402
from embedding import Embedder, utterance_windows  # noqa: E402
from export import (  # noqa: E402
    TFLITE_FILE,
    ExportError,
    export_model,
    load_savedmodel_embedder,
    load_tflite_embedder,
    loud_threshold,
)
from features import AudioError, read_audio, read_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max |exported - Python| per embedding component; measured about 1e-7 (float32 round-off).
# One utterance per speaker, 2.4 to 15 s: 1 to 19 windows after trimming.
FILES = ['1688/142285/1688-142285-0000', '1998/15444/1998-15444-0000', '2033/164914/2033-164914-0000',
         '2414/128291/2414-128291-0000', '2609/156975/2609-156975-0000', '3005/163389/3005-163389-0000',
         '3080/5032/3080-5032-0000', '3331/159605/3331-159605-0000', '367/130732/367-130732-0000',
         '533/1066/533-1066-0000', '3005/163389/3005-163389-0004']


@pytest.fixture(scope='module')
def audio_files(librispeech_dir) -> list[Path]:
    return [librispeech_dir / f'{name}.flac' for name in FILES]


@pytest.fixture(scope='module')
def rescnn() -> DeepSpeakerModel:
    model = DeepSpeakerModel(width=0.125)
    randomise(model.m, seed=5)  # random weights make the embeddings sensitive to any difference of input.
    return model


@pytest.fixture(scope='module')
def exported(rescnn, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('export')
    return {fmt: export_model(rescnn, root / fmt, fmt) for fmt in ('savedmodel', 'tflite')}


def max_difference(embed, embedder: Embedder, files: list[Path]) -> float:
    return max(float(np.abs(embed(read_audio(str(f))) - embedder.embed_file(f)).max()) for f in files)


def test_the_files_span_one_to_many_windows(audio_files):
    counts = [len(utterance_windows(read_features(str(f)))) for f in audio_files]
    assert min(counts) == 1 and max(counts) > 10


@pytest.mark.parametrize('export_format', ['savedmodel', 'tflite'])
def test_exported_model_gives_the_python_encoders_embeddings(rescnn, exported, audio_files, export_format):
    load = load_savedmodel_embedder if export_format == 'savedmodel' else load_tflite_embedder
    embed = load(exported[export_format])
    embedder = Embedder(rescnn)
    first = embed(read_audio(str(audio_files[0])))
    assert first.shape == (512,) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first), 1.0, atol=1e-5)
    assert max_difference(embed, embedder, audio_files) < TOLERANCE
    other = Embedder(DeepSpeakerModel(width=0.125))  # another model's embeddings are far off: the check can fail.
    assert max_difference(embed, other, audio_files[:1]) > 100 * TOLERANCE


def test_export_writes_the_expected_files(exported):
    assert (exported['savedmodel'] / 'saved_model.pb').is_file()
    assert (exported['tflite'] / TFLITE_FILE).stat().st_size > 100_000
    assert not [p for p in exported['savedmodel'].parent.iterdir() if p.name.startswith('.')]  # no leftovers.


@pytest.mark.parametrize('export_format', ['savedmodel', 'tflite'])
def test_audio_the_encoder_refuses_gives_a_zero_vector(rescnn, exported, export_format):
    load = load_savedmodel_embedder if export_format == 'savedmodel' else load_tflite_embedder
    embed = load(exported[export_format])
    refused = {'empty': np.zeros(0), 'silent': np.zeros(16000), 'one short click': np.r_[np.zeros(500), 0.5, 0.5]}
    for name, pcm in refused.items():
        with pytest.raises(AudioError):
            Embedder(rescnn).embed_signal(pcm.astype(np.float32), 16000)
        np.testing.assert_array_equal(embed(pcm.astype(np.float32)), np.zeros(512, np.float32), err_msg=name)


@pytest.mark.parametrize('length', [1, 2, 20, 21, 22, 101, 1000, 12345])
def test_in_graph_silence_threshold_selects_what_numpys_percentile_does(length):
    rng = np.random.default_rng(length)
    energy = np.abs(np.round(rng.standard_normal(length), 1)).astype(np.float32)  # many ties.
    threshold = float(loud_threshold(tf.constant(energy)))
    assert threshold in energy
    np.testing.assert_array_equal(energy >= threshold, energy >= np.percentile(energy, SILENCE_PERCENTILE))


@pytest.mark.parametrize('export_format', ['savedmodel', 'tflite'])
def test_tdnn_exports_too(audio_files, tmp_path, export_format):
    tdnn = TdnnModel(width=0.125)
    randomise(tdnn.m, seed=6)
    out = export_model(tdnn, tmp_path / 'tdnn', export_format)
    load = load_savedmodel_embedder if export_format == 'savedmodel' else load_tflite_embedder
    assert max_difference(load(out), Embedder(tdnn), audio_files[-3:]) < TOLERANCE


def test_gru_is_refused_for_tflite_and_nothing_is_left(tmp_path):
    with pytest.raises(ExportError, match='GRU.*savedmodel'):
        export_model(GruModel(width=0.0625), tmp_path / 'gru', 'tflite')
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_refused_then_replaced_with_overwrite(rescnn, tmp_path, audio_files):
    out = tmp_path / 'model'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    with pytest.raises(ExportError, match='already exists'):
        export_model(rescnn, out, 'savedmodel')
    assert [p.name for p in out.iterdir()] == ['keep.txt']
    export_model(rescnn, out, 'savedmodel', overwrite=True)
    assert not (out / 'keep.txt').exists() and (out / 'saved_model.pb').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
    assert max_difference(load_savedmodel_embedder(out), Embedder(rescnn), audio_files[:1]) < TOLERANCE


@pytest.mark.parametrize('out', ['.', '..', '/'])
def test_the_current_directory_or_one_above_it_is_refused_even_with_overwrite(rescnn, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'keep.txt').write_text('mine')
    with pytest.raises(ExportError, match='current directory or one above it'):
        export_model(rescnn, out, 'savedmodel', overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ['keep.txt']


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'cli.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_exports_a_checkpoint_and_refuses_an_existing_directory(rescnn, tmp_path, audio_files):
    checkpoint = tmp_path / 'tiny.keras'
    rescnn.m.save(checkpoint)
    out = tmp_path / 'exported'
    result = run_cli('export', '--checkpoint_file', str(checkpoint), '--out', str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'{out}: savedmodel' in result.stdout
    assert max_difference(load_savedmodel_embedder(out), Embedder(rescnn), audio_files[:1]) < TOLERANCE
    refused = run_cli('export', '--checkpoint_file', str(checkpoint), '--out', str(out), '--format', 'tflite')
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (f'Error: --out {out}: already exists; choose another '
                                                       f'directory or add --overwrite.')
    assert (out / 'saved_model.pb').is_file() and not (out / TFLITE_FILE).exists()
