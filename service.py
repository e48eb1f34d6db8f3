"""The speaker service: a REST API (FastAPI) and a web page over one SpeakerEncoder and one SpeakerProfiles store.

    POST /embed               an upload -> its embedding (dims floats) and duration (s)
    POST /verify              uploads a and b, or upload a and an enrolled speaker -> score, threshold, decision
    POST /speakers/{name}     enrol one or more uploads;  GET /speakers;  DELETE /speakers/{name}
    POST /identify            an upload -> the top-k enrolled speakers, 'unknown' when none reaches the threshold
    GET  /health              model, width, fingerprint, profile count, version (never needs the token)
    GET  /                    the web page (static/index.html);  /docs: the generated OpenAPI page

The model runs on one worker thread fed by a bounded queue (ModelWorker): requests arriving together are embedded
in one predict call instead of running TensorFlow many times at once on a small CPU, memory stays bounded, and a
full queue answers 503. Uploads are written to a per-request temporary directory, deleted when the request ends. Every
error is a JSON object {"error": "one line"}: 401 (token), 404 (speaker), 409 (no speakers enrolled), 413 (upload too
large or too long), 415 (file type), 422 (unreadable audio, bad field), 400 (bad speaker name), 503 (busy).
Imports speaker, embedding, features, checkpoints and constants; cli.py builds the app (create_app) and runs uvicorn.
"""

import asyncio
import hmac
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from checkpoints import architecture_of
from constants import (
    AUDIO_EXTENSIONS,
    DEFAULT_TOP_K,
    SAMPLE_RATE,
    SERVICE_MAX_SECONDS,
    SERVICE_MAX_UPLOAD_MB,
    SERVICE_QUEUE_SIZE,
    UNKNOWN_SPEAKER,
)
from embedding import utterance_windows
from features import AudioError, read_audio, signal_features
from speaker import SpeakerEncoder, SpeakerError, SpeakerProfiles, Threshold, check_speaker_name, cosine_similarity

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / 'static'
UPLOAD_CHUNK_BYTES = 1 << 20  # bytes copied at a time from an upload to its temporary file.
FORMATS = '/'.join(extension.lstrip('.') for extension in AUDIO_EXTENSIONS)


class ServiceError(Exception):
    """A request the service refuses: the HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Limits(NamedTuple):
    """Per-request limits: the request body in bytes (all uploads together) and the duration of each clip (s); and
    queue_size, the requests that may wait for the model (more are answered 503)."""
    max_upload_bytes: int = int(SERVICE_MAX_UPLOAD_MB * 1e6)
    max_seconds: float = SERVICE_MAX_SECONDS
    queue_size: int = SERVICE_QUEUE_SIZE


DEFAULT_LIMITS = Limits()

class SavedUpload(NamedTuple):
    """An upload written to the request's temporary directory: the client's file name (for messages only) and
    where it lies (`<index><suffix>`, never named after the client's name)."""
    name: str
    path: Path


class Embedded(NamedTuple):
    """An upload's unit embedding float32 (dims,) and its duration in seconds."""
    name: str
    embedding: np.ndarray
    duration: float


class Clip(NamedTuple):
    """An upload ready for the model: its client name, duration (s) and windows (windows, frames, 64, 1)."""
    name: str
    duration: float
    windows: np.ndarray


class ModelWorker:
    """One thread embedding uploads for requests queued in a queue of at most `capacity` waiting requests. It
    takes every request waiting when it gets free, computes their features and embeds all their windows in one
    predict call (a predict's fixed cost dominates short clips), so requests that arrive together are batched."""

    def __init__(self, encoder: SpeakerEncoder, capacity: int, max_seconds: float):
        self.encoder, self.capacity, self.max_seconds = encoder, capacity, max_seconds
        self.jobs: queue.Queue = queue.Queue(capacity)
        self.thread = threading.Thread(target=self.serve, name='model-worker', daemon=True)
        self.thread.start()

    def serve(self) -> None:
        """Embeds batches of waiting requests until it gets None; a request whose client left is skipped."""
        while (job := self.jobs.get()) is not None:
            batch = [job]
            while len(batch) <= self.capacity:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
            self.embed_batch([(future, uploads) for future, uploads in batch if future.set_running_or_notify_cancel()])

    def embed_batch(self, batch: list[tuple[Future, list[SavedUpload]]]) -> None:
        """Sets each request's future to its list of Embedded, or to the error of its first bad upload."""
        ready = []
        for future, uploads in batch:
            try:
                ready.append((future, [clip_of(upload, self.max_seconds, self.encoder.embedder.crop)
                                       for upload in uploads]))
            except Exception as e:  # handed to the request that sent the upload.
                future.set_exception(e)
        if not ready:
            return
        try:
            embeddings = iter(self.encoder.embedder.pooled([clip.windows for _, clips in ready for clip in clips]))
        except Exception as e:
            for future, _ in ready:
                future.set_exception(e)
            return
        for future, clips in ready:
            future.set_result([Embedded(clip.name, next(embeddings), clip.duration) for clip in clips])

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    async def embedded(self, uploads: list[SavedUpload]) -> list[Embedded]:
        """The uploads' embeddings; ServiceError 503 when `capacity` requests already wait."""
        future: Future = Future()
        try:
            self.jobs.put_nowait((future, uploads))
        except queue.Full:
            raise ServiceError(503, f'busy: {self.capacity} requests already wait for the model; retry in a '
                                    f'moment.') from None
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        """Lets the running batch finish, cancels the waiting requests and ends the thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self.jobs.put(None)
        self.thread.join(timeout=30)


class ProfileStore:
    """The service's SpeakerProfiles. A change is made on a copy, saved atomically, then swapped in under a lock:
    readers always see a whole store, and a failed save changes nothing."""

    def __init__(self, path: str | Path, fingerprint: str):
        self.lock = threading.Lock()
        self.profiles = SpeakerProfiles.open(path, fingerprint)

    def changed(self, change: Callable[[SpeakerProfiles], None]) -> SpeakerProfiles:
        """The store after change(copy) and saving it; ServiceError 500 when it cannot be written."""
        with self.lock:
            current = self.profiles
            copy = SpeakerProfiles(current.path, current.fingerprint, current.names,
                                   [current.sums[n] for n in current.names], [current.counts[n] for n in current.names])
            change(copy)
            try:
                copy.save()
            except OSError as e:
                raise ServiceError(500, f'{current.path}: cannot save the profile store ({e.strerror or e}); '
                                        f'nothing changed.') from None
            self.profiles = copy
            return copy


def known(profiles: SpeakerProfiles, name: str) -> str:
    """The speaker `name` enrolled in `profiles`; ServiceError 404 when it is not enrolled."""
    if name not in profiles.sums:
        raise ServiceError(404, f'no speaker {name!r}; enrolled: {", ".join(profiles.names) or "none"}.')
    return name


def clip_of(upload: SavedUpload, max_seconds: float, crop: bool = False) -> Clip:
    """An upload's duration and windows (utterance_windows, `crop` or whole); ServiceError 413 when longer than
    `max_seconds` (checked from the header, before decoding), AudioError when it is not readable audio or has no
    speech."""
    try:
        duration = sf.info(str(upload.path)).duration
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f'{upload.name}: not readable {FORMATS} audio ({e}); upload another file or re-encode it.') \
            from None
    if duration > max_seconds:
        raise ServiceError(413, f'{upload.name}: {duration:.1f} s long, over the limit of {max_seconds:g} s; '
                                f'upload a shorter clip.')
    audio = read_audio(str(upload.path))
    features = signal_features(audio, SAMPLE_RATE, str(upload.path))
    return Clip(upload.name, len(audio) / SAMPLE_RATE, utterance_windows(features, crop))


async def saved_uploads(files: list[UploadFile], directory: Path) -> list[SavedUpload]:
    """The uploads copied into `directory`; ServiceError 415 for a name without an accepted suffix."""
    saved = []
    for index, file in enumerate(files):
        name = file.filename or f'upload {index + 1}'
        suffix = Path(name).suffix.lower()
        if suffix not in AUDIO_EXTENSIONS:
            raise ServiceError(415, f'{name}: not a {FORMATS} file name; upload one of those formats.')
        path = directory / f'{index}{suffix}'
        with open(path, 'wb') as out:
            while chunk := await file.read(UPLOAD_CHUNK_BYTES):
                out.write(chunk)
        saved.append(SavedUpload(name, path))
    return saved


def client_message(error: Exception, uploads: list[SavedUpload]) -> str:
    """The error's message with temporary paths replaced by the client's file names."""
    message = str(error)
    for upload in uploads:
        message = message.replace(str(upload.path), upload.name)
    return message


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({'error': message}, status_code=status, headers=headers)


def validation_message(error: RequestValidationError) -> str:
    """One line for FastAPI's validation errors: 'field: reason; ...'."""
    return '; '.join(f'{" ".join(str(part) for part in e["loc"][1:]) or e["loc"][0]}: {e["msg"]}'
                     for e in error.errors())


class UploadLimit:
    """ASGI middleware refusing request bodies over `max_bytes` with 413: at once from Content-Length, or while
    the body streams in when it has none (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> str:
        return f'request body over the limit of {self.max_bytes / 1e6:g} MB; upload smaller or shorter clips.'

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        length = dict(scope['headers']).get(b'content-length')
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, self.too_large(), {'Connection': 'close'})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get('body', b''))
            if received > self.max_bytes:
                raise HTTPException(413, self.too_large())
            return message

        await self.app(scope, limited_receive, send)


def bearer_check(token: str | None) -> Callable:
    """A FastAPI dependency refusing requests without `Authorization: Bearer <token>` (401); no check when
    `token` is None."""

    def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get('authorization', '').partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ServiceError(401, 'missing or wrong token; send the header "Authorization: Bearer <token>".')

    return check


def threshold_of(default: Threshold, threshold: float | None) -> Threshold:
    """The request's threshold when it gives one, else the service's."""
    return default if threshold is None else Threshold(threshold, 'given in the request')


def ranked(matches: list[tuple[str, float]]) -> list[dict]:
    return [{'speaker': name, 'score': round(score, 6)} for name, score in matches]


def warm_up(encoder: SpeakerEncoder) -> None:
    """Embeds 2 s of noise once, so that the first request does not pay for tracing the model's graph."""
    encoder.embed_signal(np.random.default_rng(0).uniform(-0.5, 0.5, 2 * SAMPLE_RATE).astype(np.float32),
                         SAMPLE_RATE)


def create_app(encoder: SpeakerEncoder, profiles_path: str | Path, default_threshold: Threshold,
               token: str | None = None, limits: Limits = DEFAULT_LIMITS, version: str = '') -> FastAPI:
    """The service over `encoder` (loaded once) and the profile store at `profiles_path` (created on the first
    enrolment; SpeakerError when it belongs to another model). `default_threshold`: the decision threshold of
    requests that give none; `token`: the bearer token of every route but /health, the page and the docs (None: no
    token)."""
    store = ProfileStore(profiles_path, encoder.fingerprint)
    worker = ModelWorker(encoder, limits.queue_size, limits.max_seconds)
    architecture, options = architecture_of(encoder.embedder.model.m.get_config(), encoder.checkpoint_file)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title='deep-speaker', version=version, lifespan=lifespan,
                  description='Speaker embeddings, verification and identification (Deep Speaker, ResCNN). Send '
                              'audio as multipart uploads (wav, flac, ogg, mp3). With a token, send '
                              '`Authorization: Bearer <token>`.')
    app.add_middleware(UploadLimit, max_bytes=limits.max_upload_bytes)
    api = APIRouter(dependencies=[Depends(bearer_check(token))])

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, e: ServiceError) -> JSONResponse:
        headers = {'WWW-Authenticate': 'Bearer'} if e.status == 401 else {'Retry-After': '1'} if e.status == 503 \
            else None
        return error_response(e.status, e.message, headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(e))

    async def embedded(files: list[UploadFile]) -> list[Embedded]:
        """The uploads' embeddings, computed on the model worker from a temporary directory deleted after."""
        directory = Path(tempfile.mkdtemp(prefix='deep-speaker-upload-'))
        uploads: list[SavedUpload] = []
        try:
            uploads = await saved_uploads(files, directory)
            return await worker.embedded(uploads)
        except (AudioError, SpeakerError, ServiceError) as e:
            status = e.status if isinstance(e, ServiceError) else 422
            raise ServiceError(status, client_message(e, uploads)) from None
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def described(clip: Embedded) -> dict:
        return {'file': clip.name, 'duration_s': round(clip.duration, 3)}

    @app.get('/health')
    def health() -> dict:
        """Liveness and what is served: model, width, fingerprint, enrolled speakers, threshold, queue."""
        return {'status': 'ok', 'version': version, 'model': architecture, 'width': options.get('width'),
                'checkpoint': Path(encoder.checkpoint_file).name, 'fingerprint': encoder.fingerprint,
                'dims': encoder.dims, 'profiles': len(store.profiles.names), 'threshold': default_threshold.value,
                'threshold_source': default_threshold.source,
                'queue': {'waiting': worker.waiting, 'capacity': worker.capacity},
                'limits': {'max_upload_mb': limits.max_upload_bytes / 1e6, 'max_seconds': limits.max_seconds},
                'token_required': token is not None}

    @app.get('/', include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / 'index.html')

    @api.post('/embed')
    async def embed(audio: Annotated[UploadFile, File(description=f'A {FORMATS} clip.')]) -> dict:
        """The clip's unit embedding (cosine similarity of two is their score) and its duration in seconds."""
        clip, = await embedded([audio])
        return {**described(clip), 'fingerprint': encoder.fingerprint,
                'embedding': [round(float(x), 7) for x in clip.embedding]}

    @api.post('/verify')
    async def verify(a: Annotated[UploadFile, File(description='The first clip.')],
                     b: Annotated[UploadFile | None, File(description='The second clip (or give speaker).')] = None,
                     speaker: Annotated[str | None, Form(description='An enrolled speaker (instead of b).')] = None,
                     threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None) -> dict:
        """Whether clip a and clip b (or enrolled `speaker`) share a speaker: cosine score >= threshold."""
        if (b is None) == (speaker is None):
            raise ServiceError(422, 'give exactly one of the upload b and the field speaker.')
        chosen = threshold_of(default_threshold, threshold)
        if speaker is not None:
            profiles = store.profiles  # one snapshot: a concurrent DELETE cannot mismatch the names and the rows.
            profile = profiles.matrix()[profiles.names.index(known(profiles, speaker))]
            clip, = await embedded([a])
            other, versus = profile, {'speaker': speaker}
        else:
            clip, second = await embedded([a, b])
            other, versus = second.embedding, {'b': described(second)}
        score = float(cosine_similarity(clip.embedding, other))
        return {'score': round(score, 6), 'threshold': chosen.value, 'threshold_source': chosen.source,
                'same_speaker': score >= chosen.value, 'a': described(clip), **versus}

    @api.post('/identify')
    async def identify(audio: Annotated[UploadFile, File(description='The clip of an unknown speaker.')],
                       top_k: Annotated[int, Form(ge=1)] = DEFAULT_TOP_K,
                       threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None) -> dict:
        """The `top_k` enrolled speakers scoring at least the threshold, best first, or 'unknown' with the best
        score when none does."""
        profiles = store.profiles  # the store as the request found it, even if it changes meanwhile.
        if not profiles.names:
            raise ServiceError(409, 'no speakers enrolled; enrol some with POST /speakers/{name} first.')
        chosen = threshold_of(default_threshold, threshold)
        clip, = await embedded([audio])
        matches = profiles.identify(clip.embedding, top_k, chosen.value)
        return {**described(clip), 'speaker': matches[0][0], 'threshold': chosen.value,
                'threshold_source': chosen.source, 'candidates': ranked(matches),
                'unknown': matches[0][0] == UNKNOWN_SPEAKER}

    @api.get('/speakers')
    def speakers() -> dict:
        """The enrolled speakers with their number of enrolled clips."""
        profiles = store.profiles
        return {'fingerprint': profiles.fingerprint,
                'speakers': [{'name': name, 'files': profiles.counts[name]} for name in profiles.names]}

    @api.post('/speakers/{name}', status_code=201)
    async def enroll(name: str, audio: Annotated[list[UploadFile], File(description='One or more clips.')]) -> dict:
        """Enrols `name` (new, or adds clips to an enrolled speaker) from the clips; all or nothing."""
        try:
            name = check_speaker_name(name)
        except SpeakerError as e:
            raise ServiceError(400, str(e)) from None
        clips = await embedded(audio)
        updated = await run_in_threadpool(
            store.changed, lambda profiles: profiles.enroll(name, np.stack([clip.embedding for clip in clips])))
        return {'speaker': name, 'enrolled': [described(clip) for clip in clips], 'files': updated.counts[name],
                'speakers': len(updated.names)}

    @api.delete('/speakers/{name}')
    def remove(name: str) -> dict:
        """Forgets an enrolled speaker."""
        updated = store.changed(lambda profiles: profiles.remove(known(profiles, name)))
        return {'removed': name, 'speakers': len(updated.names)}

    app.include_router(api)
    return app
