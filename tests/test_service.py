"""The speaker service as users meet it: a real `python cli.py serve` process on 127.0.0.1 (a free port), real HTTP
requests (urllib, hand-built multipart bodies), the shipped checkpoint and the sample recordings: every route, the
token, the limits, the errors, the queue, temporary files, and enrolments surviving a restart."""

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cli import VERSION
from tests.conftest import REPO_ROOT

TOKEN = 'test-token-5b7f'
MAX_UPLOAD_MB = 1.5
MAX_SECONDS = 20.0
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60
CALIBRATION = json.loads((REPO_ROOT / 'models' / 'ResCNN-w0.25-librispeech100.keras.calibration.json').read_text())
LIBRISPEECH = REPO_ROOT / 'samples' / 'LibriSpeech' / 'test-other'
SPEAKER_A = [LIBRISPEECH / '1688' / '142285' / f'1688-142285-000{i}.flac' for i in (2, 3, 4)]
SPEAKER_B = [LIBRISPEECH / '2609' / '156975' / f'2609-156975-000{i}.flac' for i in (0, 1, 3)]
PHILIPPE = [REPO_ROOT / 'samples' / 'PhilippeRemy' / f'PhilippeRemy_00{i}.wav' for i in (1, 2, 3)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """A `cli.py serve` process with its port, profile store and temporary directory (TMPDIR)."""

    def __init__(self, profiles: Path, tmp: Path):
        self.profiles, self.tmp = profiles, tmp
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, 'TMPDIR': str(self.tmp), 'DEEP_SPEAKER_TOKEN': TOKEN, 'CUDA_VISIBLE_DEVICES': ''}
        self.process = subprocess.Popen(
            [sys.executable, 'cli.py', 'serve', '--profiles', str(self.profiles), '--port', str(self.port),
             '--max_upload_mb', str(MAX_UPLOAD_MB), '--max_seconds', str(MAX_SECONDS), '--queue_size', '1'],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f'serve exited: {self.process.stderr.read().decode()[-2000:]}')
            try:
                if call('GET', self.url('/health'))[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f'serve did not answer /health within {START_TIMEOUT_S} s')

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process:
            self.process.stderr.close()

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.port}{urllib.parse.quote(path, safe="/%")}'


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields and (field, file name, content) files, and its content type."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f'Content-Type: application/octet-stream\r\n\r\n'.encode())
        body.write(content + b'\r\n')
    body.write(f'--{boundary}--\r\n'.encode())
    return body.getvalue(), f'multipart/form-data; boundary={boundary}'


def call(method: str, url: str, fields: dict | None = None, files: list | None = None,
         token: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; files are (field, path) or (field, file name, bytes)."""
    headers, data = {}, None
    if fields or files:
        data, headers['Content-Type'] = multipart(
            {k: str(v) for k, v in (fields or {}).items()},
            [(f[0], Path(f[1]).name, Path(f[1]).read_bytes()) if len(f) == 2 else f for f in files or []])
    if token:
        headers['Authorization'] = f'Bearer {token}'
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope='module')
def server(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp('service')
    (root / 'tmp').mkdir()
    running = Server(root / 'profiles.npz', root / 'tmp')
    running.start()
    try:
        yield running
    finally:
        running.stop()


def api(server: Server, method: str, path: str, **kwargs) -> tuple[int, dict]:
    return call(method, server.url(path), token=TOKEN, **kwargs)


def noise_wav(seconds: float, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.random.default_rng(1).uniform(-0.3, 0.3, int(seconds * rate)), rate, format='WAV',
             subtype='PCM_16')
    return buffer.getvalue()


def test_health_needs_no_token_and_describes_the_model(server):
    status, health = call('GET', server.url('/health'))
    assert status == 200
    assert health['fingerprint'] == CALIBRATION['fingerprint']
    assert (health['model'], health['width'], health['dims'], health['version']) == ('rescnn', 0.25, 512, VERSION)
    assert health['threshold'] == pytest.approx(CALIBRATION['eer_threshold'])
    assert health['token_required'] is True
    assert health['limits'] == {'max_upload_mb': MAX_UPLOAD_MB, 'max_seconds': MAX_SECONDS}


def test_page_and_openapi_are_served(server):
    with urllib.request.urlopen(server.url('/'), timeout=REQUEST_TIMEOUT_S) as response:
        page = response.read().decode()
    assert '<title>deep-speaker</title>' in page and "'/verify'" in page and 'getUserMedia' in page
    status, schema = call('GET', server.url('/openapi.json'))
    assert status == 200
    assert {'/embed', '/verify', '/identify', '/speakers', '/speakers/{name}', '/health'} <= set(schema['paths'])
    with urllib.request.urlopen(server.url('/docs'), timeout=REQUEST_TIMEOUT_S) as response:
        assert b'swagger' in response.read().lower()


@pytest.mark.parametrize('method, path', [('GET', '/speakers'), ('POST', '/embed'), ('POST', '/verify'),
                                          ('POST', '/identify'), ('POST', '/speakers/anna'),
                                          ('DELETE', '/speakers/anna')])
def test_every_api_route_needs_the_token(server, method, path):
    files = [('audio', SPEAKER_A[0])] if method == 'POST' else None
    for token in (None, 'wrong-token'):
        status, body = call(method, server.url(path), files=files, token=token)
        assert status == 401 and 'token' in body['error']


def test_embed_gives_a_unit_vector_and_the_duration(server):
    status, body = api(server, 'POST', '/embed', files=[('audio', PHILIPPE[0])])
    assert status == 200
    embedding = np.array(body['embedding'])
    assert embedding.shape == (512,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    assert body['duration_s'] == pytest.approx(sf.info(str(PHILIPPE[0])).duration, abs=1e-3)
    assert body['file'] == PHILIPPE[0].name


def test_verify_scores_two_uploads_like_their_embeddings(server):
    embeddings = [np.array(api(server, 'POST', '/embed', files=[('audio', path)])[1]['embedding'])
                  for path in (SPEAKER_A[0], SPEAKER_A[1], SPEAKER_B[0])]
    same = api(server, 'POST', '/verify', files=[('a', SPEAKER_A[0]), ('b', SPEAKER_A[1])])
    different = api(server, 'POST', '/verify', files=[('a', SPEAKER_A[0]), ('b', SPEAKER_B[0])])
    assert same[0] == different[0] == 200
    assert same[1]['score'] == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-4)
    assert different[1]['score'] == pytest.approx(float(embeddings[0] @ embeddings[2]), abs=1e-4)
    assert same[1]['same_speaker'] and not different[1]['same_speaker']
    assert same[1]['threshold'] == pytest.approx(CALIBRATION['eer_threshold'])
    strict = api(server, 'POST', '/verify', fields={'threshold': 0.99}, files=[('a', SPEAKER_A[0]),
                                                                                ('b', SPEAKER_A[1])])[1]
    assert (strict['threshold'], strict['same_speaker']) == (0.99, False)


def test_enrol_list_identify_verify_and_delete(server):
    assert api(server, 'POST', '/speakers/Philippe Rémy', files=[('audio', p) for p in PHILIPPE[:2]])[0] == 201
    status, body = api(server, 'POST', '/speakers/reader-1688', files=[('audio', p) for p in SPEAKER_A[:2]])
    assert status == 201 and body['files'] == 2
    assert api(server, 'POST', '/speakers/reader-1688', files=[('audio', SPEAKER_A[0])])[1]['files'] == 3
    status, listed = api(server, 'GET', '/speakers')
    assert status == 200
    assert {s['name']: s['files'] for s in listed['speakers']} == {'Philippe Rémy': 2, 'reader-1688': 3}

    status, found = api(server, 'POST', '/identify', files=[('audio', PHILIPPE[2])])
    assert status == 200 and found['speaker'] == 'Philippe Rémy' and not found['unknown']
    scores = [c['score'] for c in found['candidates']]
    assert scores == sorted(scores, reverse=True) and min(scores) >= found['threshold']
    status, stranger = api(server, 'POST', '/identify', files=[('audio', SPEAKER_B[0])])
    assert status == 200 and stranger['unknown'] and stranger['speaker'] == 'unknown'
    assert stranger['candidates'][0]['score'] < stranger['threshold']
    top = api(server, 'POST', '/identify', fields={'top_k': 1, 'threshold': -1}, files=[('audio', PHILIPPE[2])])[1]
    assert [c['speaker'] for c in top['candidates']] == ['Philippe Rémy']

    status, against = api(server, 'POST', '/verify', fields={'speaker': 'reader-1688'},
                          files=[('a', SPEAKER_A[2])])
    assert status == 200 and against['same_speaker'] and against['speaker'] == 'reader-1688'

    assert api(server, 'DELETE', '/speakers/Philippe Rémy')[0] == 200
    assert [s['name'] for s in api(server, 'GET', '/speakers')[1]['speakers']] == ['reader-1688']


@pytest.mark.parametrize('fmt, suffix', [('OGG', '.ogg'), ('MP3', '.mp3')])
def test_ogg_and_mp3_uploads_verify_like_the_flac_they_encode(server, fmt, suffix):
    audio, rate = sf.read(str(SPEAKER_A[0]))
    encoded = io.BytesIO()
    sf.write(encoded, audio, rate, format=fmt)
    status, body = api(server, 'POST', '/verify',
                       files=[('a', SPEAKER_A[0]), ('b', f'clip{suffix}', encoded.getvalue())])
    assert status == 200 and body['score'] > 0.9
    assert body['b']['duration_s'] == pytest.approx(len(audio) / rate, abs=0.1)


def test_unknown_speaker_is_404(server):
    status, body = api(server, 'POST', '/verify', fields={'speaker': 'nobody'}, files=[('a', SPEAKER_A[0])])
    assert status == 404 and 'nobody' in body['error']
    status, body = api(server, 'DELETE', '/speakers/nobody')
    assert status == 404 and 'nobody' in body['error']


@pytest.mark.parametrize('name', ['a%5Cb', 'unknown', '%20', 'x' * 101])
def test_bad_speaker_name_is_400_and_changes_nothing(server, name):
    before = api(server, 'GET', '/speakers')[1]
    status, body = api(server, 'POST', f'/speakers/{name}', files=[('audio', SPEAKER_A[0])])
    assert status == 400 and 'speaker name' in body['error']
    assert api(server, 'GET', '/speakers')[1] == before


def test_bad_files_are_refused_with_the_reason(server):
    status, body = api(server, 'POST', '/embed', files=[('audio', 'notes.wav', b'not audio at all')])
    assert status == 422 and body['error'].startswith('notes.wav: not readable')
    assert 'deep-speaker-upload' not in body['error']
    silent = io.BytesIO()
    sf.write(silent, np.zeros(16000), 16000, format='WAV')
    status, body = api(server, 'POST', '/embed', files=[('audio', 'silence.wav', silent.getvalue())])
    assert status == 422 and 'silent' in body['error']
    status, body = api(server, 'POST', '/embed', files=[('audio', 'notes.txt', b'hello')])
    assert status == 415 and 'notes.txt' in body['error']
    status, body = api(server, 'POST', '/verify', files=[('a', SPEAKER_A[0])])
    assert status == 422 and 'speaker' in body['error']
    status, body = api(server, 'POST', '/embed', fields={'other': 'x'})
    assert status == 422 and 'audio' in body['error']


def test_a_failed_enrolment_enrols_nothing(server):
    before = api(server, 'GET', '/speakers')[1]
    status, _ = api(server, 'POST', '/speakers/partial', files=[('audio', SPEAKER_B[0]),
                                                                 ('audio', 'broken.flac', b'garbage')])
    assert status == 422
    assert api(server, 'GET', '/speakers')[1] == before


def oversized_response(server, headers: dict[str, str], body: bytes = b'') -> tuple[int, dict]:
    """Sends a POST /embed head (and `body`, at most one chunk past the limit) and reads the answer without sending
    more: the server answers 413 and closes as soon as it knows, so a client still sending would meet a reset."""
    connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.putrequest('POST', '/embed')
        for name, value in {'Authorization': f'Bearer {TOKEN}', **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_oversized_upload_is_413(server):
    limit = int(MAX_UPLOAD_MB * 1e6)
    declared = {'Content-Type': 'multipart/form-data; boundary=x', 'Content-Length': str(limit + 1)}
    status, body = oversized_response(server, declared)  # refused from Content-Length, before any body byte.
    assert status == 413 and 'MB' in body['error']
    data, content_type = multipart({}, [('audio', 'big.wav', noise_wav(0.1) + bytes(limit))])
    chunk = 65536
    streamed = b''.join(b'%x\r\n' % len(part) + part + b'\r\n'
                        for part in (data[i:i + chunk] for i in range(0, limit + chunk, chunk)))
    status, body = oversized_response(server, {'Content-Type': content_type, 'Transfer-Encoding': 'chunked'},
                                      streamed)  # no Content-Length: counted as the body streams in.
    assert status == 413 and 'MB' in body['error']


def test_too_long_clip_is_413(server):
    status, body = api(server, 'POST', '/embed', files=[('audio', 'long.wav', noise_wav(MAX_SECONDS + 5))])
    assert status == 413 and 'long.wav' in body['error'] and 's long' in body['error']


def test_requests_beyond_the_queue_get_503_and_the_rest_are_answered(server):
    results = []
    start = threading.Barrier(8)

    def client():
        start.wait(timeout=30)
        results.append(api(server, 'POST', '/verify', files=[('a', SPEAKER_A[0]), ('b', SPEAKER_B[1])]))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    statuses = sorted(status for status, _ in results)
    assert len(results) == 8 and set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
    assert all('busy' in body['error'] for status, body in results if status == 503)
    scores = [body['score'] for status, body in results if status == 200]
    assert max(scores) - min(scores) < 1e-4  # batched together or not, the same pair scores the same.


def test_uploads_leave_no_files_behind(server):
    assert api(server, 'POST', '/embed', files=[('audio', PHILIPPE[1])])[0] == 200
    assert list(server.tmp.iterdir()) == []


def chromium_driver():
    """A headless Chromium driven by Selenium through the system's chromedriver; skips the test without them."""
    webdriver = pytest.importorskip('selenium.webdriver')
    binary, driver = shutil.which('chromium') or shutil.which('chromium-browser'), shutil.which('chromedriver')
    if not (binary and driver):
        pytest.skip('no chromium and chromedriver (apt-get install chromium chromium-driver)')
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 '--disable-background-networking', '--window-size=900,1000'):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_the_page_verifies_enrols_and_identifies_in_a_real_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser = chromium_driver()
    try:
        browser.get(server.url('/'))
        wait = WebDriverWait(browser, REQUEST_TIMEOUT_S)
        wait.until(lambda b: 'token required' in b.find_element(By.ID, 'health').text)
        browser.find_element(By.ID, 'token').send_keys(TOKEN)

        def clip(slot: str, path: Path) -> None:
            browser.find_element(By.CSS_SELECTOR, f'[data-clip="{slot}"] input[type=file]').send_keys(str(path))

        def result(section: str) -> str:
            browser.find_element(By.ID, f'{section}-button').click()
            return wait.until(lambda b: (text := b.find_element(By.ID, f'{section}-result').text)
                              and not text.endswith('…') and text)

        clip('a', SPEAKER_A[0])
        clip('b', SPEAKER_A[1])
        expected = api(server, 'POST', '/verify', files=[('a', SPEAKER_A[0]), ('b', SPEAKER_A[1])])[1]
        assert result('verify') == (f'Same speaker: score {expected["score"]:.3f} '
                                    f'(threshold {expected["threshold"]:.3f})')
        clip('b', SPEAKER_B[0])
        assert result('verify').startswith('Different speakers: score ')
        browser.find_element(By.ID, 'enrol-name').send_keys('page-philippe')
        clip('enrol', PHILIPPE[0])
        assert result('enrol') == 'Enrolled page-philippe (1 clip).'
        assert 'page-philippe' in {s['name'] for s in api(server, 'GET', '/speakers')[1]['speakers']}
        clip('identify', PHILIPPE[1])
        assert result('identify').startswith('page-philippe (page-philippe ')
        wait.until(lambda b: 'page-philippe' in b.find_element(By.ID, 'speakers').text)
    finally:
        browser.quit()


def test_serve_refuses_a_file_that_is_not_a_profile_store(tmp_path):
    store = tmp_path / 'speakers.npz'
    store.write_text('not a store')
    result = subprocess.run([sys.executable, 'cli.py', 'serve', '--profiles', str(store), '--port', str(free_port())],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f'Error: {store}: not a speaker profile store')


def test_enrolments_survive_a_restart(server):
    enrolled = api(server, 'POST', '/speakers/survivor', files=[('audio', SPEAKER_B[0])])
    assert enrolled[0] == 201
    before = api(server, 'GET', '/speakers')[1]
    server.stop()
    server.start()
    assert api(server, 'GET', '/speakers')[1] == before
    status, found = api(server, 'POST', '/identify', files=[('audio', SPEAKER_B[1])])
    assert status == 200 and found['speaker'] == 'survivor'
