"""embedding.py: embed_crops against a direct model call, and the Embedder's crops, features, signal, file and
files, whole-utterance windows or a centre crop, from a model or from a checkpoint."""

import os
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from model_helpers import randomise  # noqa: E402

import embedding  # noqa: E402
from batcher import sample_from_mfcc  # noqa: E402
from constants import NUM_FRAMES  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from embedding import Embedder, embed_crops, utterance_windows  # noqa: E402
from features import AudioError, read_features  # noqa: E402

WIDTH = 0.125
AUDIO_ROOT = Path(__file__).resolve().parents[1] / 'samples' / 'LibriSpeech' / 'test-other'
SHORT_A1, SHORT_A2 = '3005/163389/3005-163389-0004.flac', '3005/163389/3005-163389-0007.flac'
SHORT_B1 = '367/130732/367-130732-0000.flac'
LONG = '1688/142285/1688-142285-0003.flac'  # 5 s, 380 frames after trimming: four windows.


@pytest.fixture(scope='module')
def model() -> DeepSpeakerModel:
    speaker_model = DeepSpeakerModel(width=WIDTH)
    randomise(speaker_model.m, seed=3)
    return speaker_model


@pytest.fixture(scope='module')
def untrained() -> DeepSpeakerModel:
    return DeepSpeakerModel(width=WIDTH)


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


# --- Windows, and the embeddings of whole files ------------------------------------------------------------------

def random_features(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, 64)).astype(np.float32)


def expected_starts(frames: int) -> list[int]:
    """Windows of 160 frames every 80, plus one ending at the last frame if the hop does not land there."""
    starts = list(range(0, frames - 160 + 1, 80))
    if starts[-1] != frames - 160:
        starts.append(frames - 160)
    return starts


def test_crop_gives_the_centre_crop():
    mfcc = random_features(500)
    windows = embedding.utterance_windows(mfcc, crop=True)
    assert windows.shape == (1, 160, 64, 1) and windows.dtype == np.float32
    np.testing.assert_array_equal(windows[0, :, :, 0], mfcc[170:330])


@pytest.mark.parametrize('frames', [161, 239, 240, 400, 500, 1234])
def test_long_utterance_windows_are_slices_every_80_frames(frames):
    mfcc = random_features(frames)
    windows = embedding.utterance_windows(mfcc, crop=False)
    starts = expected_starts(frames)
    assert windows.shape == (len(starts), 160, 64, 1) and windows.dtype == np.float32
    for window, start in zip(windows, starts, strict=True):
        np.testing.assert_array_equal(window[:, :, 0], mfcc[start:start + 160])
    np.testing.assert_array_equal(windows[-1, -1, :, 0], mfcc[-1])  # the last window ends at the last frame.


@pytest.mark.parametrize('crop', [False, True])
def test_exact_and_short_utterances_give_one_window(crop):
    exact = random_features(160)
    np.testing.assert_array_equal(embedding.utterance_windows(exact, crop)[:, :, :, 0], exact[np.newaxis])
    short = random_features(100)
    windows = embedding.utterance_windows(short, crop)
    assert windows.shape == (1, 160, 64, 1)
    np.testing.assert_array_equal(windows[0, :100, :, 0], short)
    assert not windows[0, 100:].any()


def manual_embedding(model, path: Path, crop: bool) -> np.ndarray:
    from audio import read_mfcc
    windows = embedding.utterance_windows(read_mfcc(str(path)), crop)
    mean = model.m.predict(windows, verbose=0).astype(np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_embed_utterances_is_deterministic_unit_norm_and_the_mean_of_its_windows(untrained):
    from audio import read_mfcc

    files = [AUDIO_ROOT / LONG, AUDIO_ROOT / SHORT_A1, AUDIO_ROOT / SHORT_B1]
    assert len(embedding.utterance_windows(read_mfcc(str(files[0])), crop=False)) == 4
    first = embedding.embed_utterances(untrained, files)
    second = embedding.embed_utterances(untrained, files)
    assert first.shape == (3, 512) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    for row, path in zip(first, files, strict=True):
        np.testing.assert_allclose(row, manual_embedding(untrained, path, crop=False), atol=2e-5)

    cropped = embedding.embed_utterances(untrained, files, crop=True)
    np.testing.assert_allclose(np.linalg.norm(cropped, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cropped[0], manual_embedding(untrained, files[0], crop=True), atol=2e-5)
    assert np.abs(cropped[0] - first[0]).max() > 1e-3  # the long file: one crop is not the whole utterance.


def test_embed_utterances_over_several_chunks_keeps_the_file_order(untrained):
    files = [AUDIO_ROOT / LONG, AUDIO_ROOT / SHORT_A2] * 17  # 34 files: two chunks of up to 32.
    embeddings = embedding.embed_utterances(untrained, files)
    assert embeddings.shape == (34, 512)
    long_alone, short_alone = embedding.embed_utterances(untrained, files[:2])
    np.testing.assert_allclose(embeddings[0::2], np.tile(long_alone, (17, 1)), atol=2e-5)
    np.testing.assert_allclose(embeddings[1::2], np.tile(short_alone, (17, 1)), atol=2e-5)
    assert np.abs(long_alone - short_alone).max() > 1e-3


def test_embed_files_computing_features_ahead_gives_the_numbers_of_computing_them_in_turn(model, tmp_path):
    paths = sorted(AUDIO_ROOT.rglob('*.flac'))[:40]  # two chunks of up to 32 files.
    embedder = Embedder(model)
    in_turn = np.concatenate([embedder.pooled([utterance_windows(read_features(str(f))) for f in chunk])
                              for chunk in (paths[:32], paths[32:])])
    np.testing.assert_array_equal(embedder.embed_files(paths), in_turn)
    bad = tmp_path / 'bad.flac'
    bad.write_bytes(b'not audio')
    with pytest.raises(AudioError, match='bad.flac'):
        embedder.embed_files(paths[:33] + [bad])
