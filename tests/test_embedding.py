"""embedding.py: embed_crops against a direct model call, and the Embedder's crops, features, signal, file and
files, whole-utterance windows or a centre crop, from a model or from a checkpoint."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from model_helpers import randomise  # noqa: E402

from batcher import sample_from_mfcc  # noqa: E402
from constants import NUM_FRAMES  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from embedding import Embedder, embed_crops, utterance_windows  # noqa: E402
from features import read_features  # noqa: E402

WIDTH = 0.125


@pytest.fixture(scope='module')
def model() -> DeepSpeakerModel:
    speaker_model = DeepSpeakerModel(width=WIDTH)
    randomise(speaker_model.m, seed=3)
    return speaker_model


@pytest.fixture(scope='module')
def files(librispeech_dir, samples_dir) -> dict:
    return {'long': librispeech_dir / '1688' / '142285' / '1688-142285-0003.flac',  # 380 frames: four windows.
            'short': librispeech_dir / '3005' / '163389' / '3005-163389-0004.flac',
            'wav48k': samples_dir / 'PhilippeRemy' / 'PhilippeRemy_001.wav'}


def test_embed_crops_is_the_models_inference_output_in_chunks(model):
    crops = np.random.default_rng(0).standard_normal((70, NUM_FRAMES, 64, 1)).astype(np.float32)
    direct = keras.ops.convert_to_numpy(model.m(crops, training=False))
    embeddings = embed_crops(model.m, crops)
    assert embeddings.shape == (70, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, direct, atol=1e-6)
    np.testing.assert_allclose(embed_crops(model.m, crops, batch_size=16), direct, atol=1e-6)
    np.testing.assert_allclose(Embedder(model).embed_crops(crops), direct, atol=1e-6)


def test_file_features_and_signal_give_the_same_embedding(model, files):
    embedder = Embedder(model)
    for path in files.values():
        from_file = embedder.embed_file(path)
        assert from_file.shape == (512,) and from_file.dtype == np.float32
        np.testing.assert_array_equal(embedder.embed_features(read_features(str(path))), from_file)
        signal, rate = sf.read(path, dtype='float32')
        np.testing.assert_array_equal(embedder.embed_signal(signal, rate), from_file)
        np.testing.assert_array_equal(embedder.embed_file(path), from_file)  # deterministic.
        np.testing.assert_allclose(np.linalg.norm(from_file), 1.0, atol=1e-5)


def test_a_file_is_the_renormalised_mean_of_its_windows_or_its_centre_crop(model, files):
    features = read_features(str(files['long']))
    windows = utterance_windows(features)
    assert len(windows) == 4
    mean = embed_crops(model.m, windows).astype(np.float64).mean(axis=0)
    whole = Embedder(model).embed_file(files['long'])
    np.testing.assert_allclose(whole, mean / np.linalg.norm(mean), atol=2e-6)
    centre = embed_crops(model.m, sample_from_mfcc(features, NUM_FRAMES)[np.newaxis])[0]
    cropped = Embedder(model, crop=True).embed_file(files['long'])
    np.testing.assert_allclose(cropped, centre / np.linalg.norm(centre), atol=2e-6)
    assert np.abs(cropped - whole).max() > 1e-3


def test_embed_files_rows_are_the_embeddings_of_each_file(model, files):
    embedder = Embedder(model)
    paths = list(files.values())
    embeddings = embedder.embed_files(paths)
    assert embeddings.shape == (3, 512) and embeddings.dtype == np.float32
    for row, path in zip(embeddings, paths, strict=True):
        np.testing.assert_allclose(row, embedder.embed_file(path), atol=1e-6)
    assert np.abs(embeddings[0] - embeddings[1]).max() > 1e-3


def test_from_checkpoint_embeds_as_the_saved_model(model, files, tmp_path):
    path = tmp_path / 'ResCNN_best.keras'
    model.m.save(path)
    loaded = Embedder.from_checkpoint(str(path), crop=True)
    assert loaded.crop and loaded.model.width == WIDTH
    np.testing.assert_allclose(loaded.embed_file(files['short']), Embedder(model, crop=True).embed_file(files['short']),
                               atol=1e-6)
