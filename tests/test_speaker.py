"""speaker.py with the shipped checkpoint on the sample files: embeddings (deterministic, unit, file = signal, any
rate and channels, many files with bad ones skipped), cosine similarity, verify (symmetric, thresholds given or
calibrated), the thresholds at the EER and minDCF of a hand-worked case, input expansion (folders, lists, Kaldi
wav.scp), and the profile store (enrol, incremental enrolment, identify open-set, remove, save, refusals)."""

import json
import os
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

from constants import DEFAULT_CHECKPOINT, UNKNOWN_SPEAKER  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from eval_metrics import eer_threshold, min_dcf_threshold  # noqa: E402
from features import AudioError  # noqa: E402
from speaker import (  # noqa: E402
    CalibrationMissing,
    SpeakerEncoder,
    SpeakerError,
    SpeakerProfiles,
    audio_inputs,
    calibration_file_of,
    cosine_similarity,
)

ROOT = Path(__file__).resolve().parents[1]
PHILIPPE = [ROOT / 'samples' / 'PhilippeRemy' / f'PhilippeRemy_00{i}.wav' for i in range(1, 5)]
OTHER = ROOT / 'samples' / '1255-90413-0001.flac'
LIBRI = ROOT / 'samples' / 'LibriSpeech' / 'test-other'


@pytest.fixture(scope='module')
def encoder() -> SpeakerEncoder:
    return SpeakerEncoder()


@pytest.fixture(scope='module')
def embeddings(encoder) -> dict:
    """Embeddings of the four PhilippeRemy files and of two LibriSpeech speakers' first three files."""
    files = PHILIPPE + sorted((LIBRI / '1688').rglob('*.flac'))[:3] + sorted((LIBRI / '3005').rglob('*.flac'))[:3]
    embedded = encoder.embed_files(files)
    return dict(zip(embedded.paths, embedded.embeddings, strict=True))


@pytest.fixture(scope='module')
def narrow_checkpoint(tmp_path_factory) -> Path:
    """A width-0.125 ResCNN checkpoint (untrained): another model than the shipped one."""
    path = tmp_path_factory.mktemp('narrow') / 'narrow.keras'
    DeepSpeakerModel(width=0.125).m.save(path)
    return path


def test_a_file_embeds_to_a_deterministic_unit_vector_equal_to_its_signal(encoder):
    first = encoder.embed_file(PHILIPPE[0])
    assert first.shape == (512,) and first.dtype == np.float32 and encoder.dims == 512
    np.testing.assert_allclose(np.linalg.norm(first), 1.0, atol=1e-5)
    np.testing.assert_array_equal(encoder.embed_file(PHILIPPE[0]), first)
    signal, rate = sf.read(PHILIPPE[0], dtype='float32')
    assert rate == 48000
    np.testing.assert_array_equal(encoder.embed_signal(signal, rate), first)
    stereo = np.stack([signal, signal], axis=1)
    np.testing.assert_allclose(encoder.embed_signal(stereo, rate), first, atol=1e-6)
    with pytest.raises(AudioError, match='samples, channels'):
        encoder.embed_signal(stereo[np.newaxis], rate)


def test_many_files_embed_as_each_alone_and_bad_ones_are_skipped_with_the_reason(encoder, tmp_path):
    empty, silent, garbage = tmp_path / 'empty.wav', tmp_path / 'silent.wav', tmp_path / 'garbage.flac'
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    garbage.write_bytes(b'not audio at all')
    files = [PHILIPPE[0], empty, OTHER, silent, garbage, PHILIPPE[1]]
    embedded = encoder.embed_files(files)
    assert embedded.paths == [str(PHILIPPE[0]), str(OTHER), str(PHILIPPE[1])]
    assert embedded.embeddings.shape == (3, 512) and embedded.embeddings.dtype == np.float32
    for path, embedding in zip(embedded.paths, embedded.embeddings, strict=True):
        np.testing.assert_allclose(embedding, encoder.embed_file(path), atol=1e-5)
    reasons = dict(embedded.skipped)
    assert list(reasons) == [str(empty), str(silent), str(garbage)]
    assert 'empty or silent' in reasons[str(empty)] and 'empty or silent' in reasons[str(silent)]
    assert 'not a readable' in reasons[str(garbage)]
    nothing = encoder.embed_files([garbage])
    assert nothing.paths == [] and nothing.embeddings.shape == (0, 512)


def test_cosine_similarity_of_vectors_and_matrices():
    a, b = np.array([3.0, 4.0]), np.array([4.0, 3.0])
    assert cosine_similarity(a, b) == pytest.approx(24 / 25)
    matrix = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity(matrix, a), [0.6, 0.8, -0.6])
    np.testing.assert_allclose(cosine_similarity(a, matrix), [0.6, 0.8, -0.6])
    pairwise = cosine_similarity(matrix, matrix[:2])
    assert pairwise.shape == (3, 2)
    np.testing.assert_allclose(pairwise, [[1, 0], [0, 1], [-1, 0]], atol=1e-7)
    with pytest.raises(SpeakerError, match='non-zero'):
        cosine_similarity(np.zeros(2), a)


def test_verify_is_symmetric_and_decides_by_the_threshold(encoder, embeddings):
    same = encoder.verify(PHILIPPE[0], PHILIPPE[1], threshold=0.3)
    assert encoder.verify(PHILIPPE[1], PHILIPPE[0], threshold=0.3).score == same.score
    different = encoder.verify(PHILIPPE[0], OTHER, threshold=0.3)
    assert encoder.verify(OTHER, PHILIPPE[0], threshold=0.3).score == different.score
    assert same.score > different.score
    expected = float(embeddings[str(PHILIPPE[0])] @ embeddings[str(PHILIPPE[1])])
    assert same.score == pytest.approx(expected, abs=1e-5)
    from_embeddings = encoder.verify(embeddings[str(PHILIPPE[0])], embeddings[str(PHILIPPE[1])], threshold=0.3)
    assert from_embeddings.score == pytest.approx(same.score, abs=1e-5)
    assert encoder.verify(PHILIPPE[0], PHILIPPE[1], threshold=same.score).same_speaker
    assert not encoder.verify(PHILIPPE[0], PHILIPPE[1], threshold=min(1.0, same.score + 1e-4)).same_speaker
    for bad in (1.5, -1.01):
        with pytest.raises(SpeakerError, match=r'outside \[-1, 1\]'):
            encoder.verify(PHILIPPE[0], PHILIPPE[1], threshold=bad)
    with pytest.raises(SpeakerError, match=r'expected \(512,\)'):
        encoder.verify(np.ones(16), PHILIPPE[1], threshold=0.3)


def test_without_a_threshold_the_shipped_calibration_decides(encoder):
    recorded = json.loads(calibration_file_of(DEFAULT_CHECKPOINT).read_text())
    assert recorded['fingerprint'] == encoder.fingerprint
    eer = encoder.decision_threshold()
    assert eer.value == recorded['eer_threshold'] and recorded['trials'] in eer.source and 'EER' in eer.source
    assert encoder.decision_threshold(operating_point='min_dcf').value == recorded['min_dcf_threshold']
    assert encoder.decision_threshold(0.25) == (0.25, 'given')
    result = encoder.verify(PHILIPPE[0], OTHER)
    assert result.threshold == recorded['eer_threshold'] and result.same_speaker == (result.score >= result.threshold)


def test_a_missing_or_foreign_calibration_is_refused(encoder, narrow_checkpoint, tmp_path):
    narrow = SpeakerEncoder(narrow_checkpoint)
    assert narrow.fingerprint != encoder.fingerprint and 'width=0.125' in narrow.fingerprint
    with pytest.raises(CalibrationMissing, match='narrow.keras.calibration.json: no such calibration file'):
        narrow.decision_threshold()
    with pytest.raises(SpeakerError, match='thresholds of another model'):
        narrow.decision_threshold(calibration=calibration_file_of(DEFAULT_CHECKPOINT))
    corrupt = tmp_path / 'corrupt.json'
    corrupt.write_text('{"fingerprint": ')
    with pytest.raises(SpeakerError, match='not a calibration file'):
        encoder.decision_threshold(calibration=corrupt)


def test_thresholds_at_the_eer_and_at_min_dcf_of_a_hand_worked_case():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # accept >= 0.35: one miss of 3 targets (0.3), one false alarm of 3 non-targets (0.4): the EER.
    assert eer_threshold(scores, labels) == pytest.approx(0.35)
    # accept >= 0.45: miss 1/3 and no false alarm, cost 0.01 * 1/3; any lower threshold pays 0.99 * 1/3.
    assert min_dcf_threshold(scores, labels) == pytest.approx(0.45)
    # every non-target above every target: rejecting everything is cheapest; the threshold lies above them all.
    assert min_dcf_threshold(np.array([0.1, 0.9]), np.array([1, 0])) > 0.9


def test_folders_lists_and_kaldi_scp_expand_to_labelled_audio(tmp_path, monkeypatch):
    found = audio_inputs([LIBRI])
    assert len(found) == 100 and len({entry.speaker for entry in found}) == 10
    assert all(Path(entry.path).parts[-3] == entry.speaker for entry in found)
    assert [entry.speaker for entry in audio_inputs([LIBRI / '1688'])] == ['142285'] * 10
    assert audio_inputs([OTHER]) == [(str(OTHER), None, str(OTHER))]
    (tmp_path / 'speaker' / 'utterances').mkdir(parents=True)
    (tmp_path / 'speaker' / 'utterances' / 'a.wav').write_bytes(PHILIPPE[0].read_bytes())
    (tmp_path / 'b.wav').write_bytes(PHILIPPE[1].read_bytes())
    assert [(Path(p).name, s) for p, s, _ in audio_inputs([tmp_path])] == [('b.wav', None), ('a.wav', 'speaker')]
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / 'files.txt'
    listing.write_text(f'# comment\n{OTHER}\n\nb.wav\n')
    assert audio_inputs([listing]) == [(str(OTHER), None, str(OTHER)), ('b.wav', None, 'b.wav')]
    scp = tmp_path / 'wav.scp'
    scp.write_text(f'utt-1 {PHILIPPE[2]}\nutt-2 speaker/utterances/a.wav\n')
    assert audio_inputs([scp, OTHER, PHILIPPE[2]]) == [(str(PHILIPPE[2]), None, 'utt-1'),
                                                       ('speaker/utterances/a.wav', None, 'utt-2'),
                                                       (str(OTHER), None, str(OTHER))]


@pytest.mark.parametrize('content, message', [
    ('utt-1 sox in.sph -t wav - |\n', r'wav.scp:1: a piped command'),
    ('utt-1 missing.wav\n', r'wav.scp:1: no such audio file'),
    ('# only a comment\n', r'lists no audio files'),
])
def test_a_bad_list_file_is_refused_with_its_line(tmp_path, content, message):
    scp = tmp_path / 'wav.scp'
    scp.write_text(content)
    with pytest.raises(SpeakerError, match=message):
        audio_inputs([scp])


def test_a_binary_file_given_as_a_list_is_refused_by_name(tmp_path):
    fake = tmp_path / 'list.txt'
    fake.write_bytes(PHILIPPE[0].read_bytes())
    with pytest.raises(SpeakerError, match=r'list\.txt: not a text list of audio paths'):
        audio_inputs([fake])


def test_a_store_whose_arrays_disagree_is_refused_by_name(tmp_path):
    path = tmp_path / 'mismatch.npz'
    np.savez(path, version=np.array(1), fingerprint=np.array('m'), names=np.array(['a', 'b']),
             sums=np.ones((1, 4)), counts=np.array([1, 1]))
    with pytest.raises(SpeakerError, match=r'mismatch\.npz: not a speaker profile store \(2 names'):
        SpeakerProfiles.read(path)


def test_a_folder_without_audio_or_a_missing_input_is_refused(tmp_path):
    (tmp_path / 'notes.txt.bak').write_text('no audio here')
    with pytest.raises(SpeakerError, match='no audio files'):
        audio_inputs([tmp_path])
    with pytest.raises(SpeakerError, match='no such file or folder'):
        audio_inputs([tmp_path / 'nothing.wav'])


def test_enrolled_from_one_file_the_same_file_identifies_with_score_one(encoder, tmp_path):
    profiles = SpeakerProfiles.open(tmp_path / 'profiles.npz', encoder.fingerprint)
    assert profiles.names == []
    profiles.enroll('philippe', encoder.embed_file(PHILIPPE[0]))
    profiles.enroll('other', encoder.embed_file(OTHER))
    ranked = profiles.identify(encoder.embed_file(PHILIPPE[0]))
    assert ranked[0][0] == 'philippe' and ranked[0][1] == pytest.approx(1.0, abs=1e-6)
    assert [name for name, _ in ranked] == ['philippe', 'other'] and ranked[1][1] < 0.9


def test_enrolled_speakers_are_identified_from_their_own_files(embeddings, encoder, tmp_path):
    by_speaker = {'philippe': [str(p) for p in PHILIPPE[:2]]}
    for speaker in ('1688', '3005'):
        by_speaker[speaker] = [p for p in embeddings if f'/{speaker}/' in p]
    profiles = SpeakerProfiles(tmp_path / 'profiles.npz', encoder.fingerprint)
    for speaker, files in by_speaker.items():
        profiles.enroll(speaker, np.stack([embeddings[f] for f in files]))
    for speaker, files in by_speaker.items():
        results = profiles.identify(np.stack([embeddings[f] for f in files]), top_k=2)
        assert [ranked[0][0] for ranked in results] == [speaker] * len(files)
        assert all(len(ranked) == 2 for ranked in results)
    mean = np.mean([embeddings[f] for f in by_speaker['philippe']], axis=0)
    np.testing.assert_allclose(profiles.matrix()[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_enrolling_in_several_calls_equals_enrolling_at_once(embeddings, encoder, tmp_path):
    files = [str(p) for p in PHILIPPE]
    at_once = SpeakerProfiles(tmp_path / 'once.npz', encoder.fingerprint)
    at_once.enroll('philippe', np.stack([embeddings[f] for f in files]))
    in_steps = SpeakerProfiles(tmp_path / 'steps.npz', encoder.fingerprint)
    in_steps.enroll('philippe', embeddings[files[0]])
    in_steps.save()
    reopened = SpeakerProfiles.open(tmp_path / 'steps.npz', encoder.fingerprint)
    reopened.enroll('philippe', np.stack([embeddings[f] for f in files[1:]]))
    assert reopened.counts == at_once.counts == {'philippe': 4}
    np.testing.assert_allclose(reopened.matrix(), at_once.matrix(), atol=1e-7)
    query = embeddings[files[2]]
    assert reopened.identify(query)[0][1] == pytest.approx(at_once.identify(query)[0][1], abs=1e-6)


def test_open_set_answers_unknown_below_the_threshold(embeddings, encoder, tmp_path):
    profiles = SpeakerProfiles(tmp_path / 'p.npz', encoder.fingerprint)
    profiles.enroll('philippe', embeddings[str(PHILIPPE[0])])
    own, stranger = embeddings[str(PHILIPPE[1])], embeddings[next(p for p in embeddings if '/3005/' in p)]
    best_stranger = float(profiles.matrix()[0] @ stranger)
    ranked = profiles.identify(stranger, threshold=min(1.0, best_stranger + 0.01))
    assert ranked == [(UNKNOWN_SPEAKER, pytest.approx(best_stranger, abs=1e-6))]
    assert profiles.identify(own, threshold=float(profiles.matrix()[0] @ own) - 0.01)[0][0] == 'philippe'
    with pytest.raises(SpeakerError, match=r'outside \[-1, 1\]'):
        profiles.identify(own, threshold=2.0)


def test_save_round_trips_without_pickle_and_remove_forgets(embeddings, encoder, tmp_path):
    path = tmp_path / 'profiles.npz'
    profiles = SpeakerProfiles.open(path, encoder.fingerprint)
    profiles.enroll('philippe', np.stack([embeddings[str(p)] for p in PHILIPPE[:3]]))
    profiles.enroll('Zoë Ñ', embeddings[str(PHILIPPE[3])])
    profiles.save()
    assert not [p for p in tmp_path.iterdir() if p.name != 'profiles.npz']  # no temporary file left.
    with np.load(path, allow_pickle=False) as data:
        assert list(data['names']) == ['philippe', 'Zoë Ñ'] and list(data['counts']) == [3, 1]
        assert str(data['fingerprint']) == encoder.fingerprint
    again = SpeakerProfiles.read(path)
    assert again.names == ['philippe', 'Zoë Ñ'] and again.fingerprint == encoder.fingerprint
    np.testing.assert_allclose(again.matrix(), profiles.matrix(), atol=0)
    again.remove('philippe')
    again.save()
    assert SpeakerProfiles.read(path).names == ['Zoë Ñ']
    with pytest.raises(SpeakerError, match="no speaker 'philippe'; enrolled: Zoë Ñ"):
        again.remove('philippe')
    again.remove('Zoë Ñ')
    with pytest.raises(SpeakerError, match='no enrolled speakers'):
        again.identify(embeddings[str(PHILIPPE[0])])


def test_a_store_of_another_model_or_a_corrupt_one_is_refused(encoder, embeddings, narrow_checkpoint, tmp_path):
    path = tmp_path / 'profiles.npz'
    profiles = SpeakerProfiles.open(path, encoder.fingerprint)
    profiles.enroll('philippe', embeddings[str(PHILIPPE[0])])
    profiles.save()
    narrow = SpeakerEncoder(narrow_checkpoint)
    with pytest.raises(SpeakerError, match=r'another model \(ResCNN width=0.25 .*not with this checkpoint '
                                           r'\(ResCNN width=0.125'):
        SpeakerProfiles.open(path, narrow.fingerprint)
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SpeakerError, match='not a speaker profile store'):
        SpeakerProfiles.open(corrupt, encoder.fingerprint)
    other = tmp_path / 'other.npz'
    np.savez(other, something=np.zeros(3))
    with pytest.raises(SpeakerError, match='not a speaker profile store'):
        SpeakerProfiles.read(other)
    with pytest.raises(SpeakerError, match='no such profile store'):
        SpeakerProfiles.read(tmp_path / 'missing.npz')


@pytest.mark.parametrize('name', ['', '   ', '../etc', 'a/b', 'a\\b', 'x' * 101, 'tab\there', UNKNOWN_SPEAKER])
def test_bad_speaker_names_are_refused(encoder, embeddings, tmp_path, name):
    profiles = SpeakerProfiles(tmp_path / 'p.npz', encoder.fingerprint)
    with pytest.raises(SpeakerError, match='speaker name'):
        profiles.enroll(name, embeddings[str(PHILIPPE[0])])
    assert profiles.names == []
