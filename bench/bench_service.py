"""Load test of the speaker service on loopback: starts `cli.py serve` (shipped ResCNN width 0.25) on a free port,
enrols the 10 sample LibriSpeech speakers (5 utterances each), then for each route (/verify of two uploads,
/identify of one) and each number of concurrent clients runs the clients for --seconds (at most --max_requests
requests) and prints requests per second, p50/p95/p99 latency, errors (non-200 answers) and the server's RSS
(now and peak, from /proc).

    .venv/bin/python bench/bench_service.py [--clients 1 --clients 4] [--seconds 60] [--max_requests 5000]
"""

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from itertools import count
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIBRISPEECH = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, Path]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, path) uploads, and its content type."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for field, path in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
                   f'Content-Type: application/octet-stream\r\n\r\n'.encode() + path.read_bytes() + b'\r\n')
    body.write(f'--{boundary}--\r\n'.encode())
    return body.getvalue(), f'multipart/form-data; boundary={boundary}'


def post(url: str, body: tuple[bytes, str]) -> int:
    """The status of a POST of a prepared multipart body."""
    request = urllib.request.Request(url, data=body[0], headers={'Content-Type': body[1]}, method='POST')
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        with e:
            return e.code


def memory_kb(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), kB."""
    lines = Path(f'/proc/{pid}/status').read_text().splitlines()
    return {key: int(line.split()[1]) for line in lines for key in ('VmRSS', 'VmHWM') if line.startswith(key + ':')}


def load(url: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads posting `bodies` in turn until `seconds` pass or `max_requests` are sent."""
    latencies, statuses, lock, tickets = [], [], threading.Lock(), count()
    deadline = time.monotonic() + seconds

    def client():
        while time.monotonic() < deadline and (ticket := next(tickets)) < max_requests:
            start = time.perf_counter()
            status = post(url, bodies[ticket % len(bodies)])
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses.append(status)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
    return {'requests': len(statuses), 'rps': len(statuses) / elapsed, 'p50': p50, 'p95': p95, 'p99': p99,
            'errors': sum(status != 200 for status in statuses)}


@click.command()
@click.option('--clients', multiple=True, default=(1, 4), show_default=True, type=click.IntRange(min=1))
@click.option('--seconds', default=60.0, show_default=True, type=click.FloatRange(min=1),
              help='Duration of each run.')
@click.option('--max_requests', default=5000, show_default=True, type=click.IntRange(min=1),
              help='Most requests of each run.')
def main(clients, seconds, max_requests):
    speakers = sorted(LIBRISPEECH.iterdir())
    utterances = {s.name: sorted(s.rglob('*.flac')) for s in speakers if s.is_dir()}
    port, workdir = free_port(), Path(os.environ.get('TMPDIR', '/tmp')) / f'bench-service-{os.getpid()}'
    workdir.mkdir(parents=True)
    server = subprocess.Popen([sys.executable, 'cli.py', 'serve', '--profiles', str(workdir / 'profiles.npz'),
                               '--port', str(port), '--queue_size', str(max(8, 2 * max(clients)))], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f'{base}/health', timeout=5) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit('the server did not start') from None
                time.sleep(0.5)
        for name, files in utterances.items():
            assert post(f'{base}/speakers/{name}', multipart([('audio', f) for f in files[:5]])) == 201
        rest = [f for files in utterances.values() for f in files[5:]]
        verify = [multipart([('a', a), ('b', b)]) for a, b in zip(rest, rest[7:] + rest[:7], strict=True)]
        identify = [multipart([('audio', f)]) for f in rest]
        print(f'{health["fingerprint"]}, {len(utterances)} speakers enrolled, {os.cpu_count()} CPUs; '
              f'{seconds:g} s per run (at most {max_requests} requests)')
        print('| route | clients | requests | req/s | p50 ms | p95 ms | p99 ms | errors | server RSS MB |')
        print('|---|---|---|---|---|---|---|---|---|')
        for route, bodies in (('/verify', verify), ('/identify', identify)):
            for n in clients:
                result = load(f'{base}{route}', bodies, n, seconds, max_requests)
                rss = memory_kb(server.pid)['VmRSS'] / 1024
                print(f'| {route} | {n} | {result["requests"]} | {result["rps"]:.2f} | {result["p50"]:.0f} | '
                      f'{result["p95"]:.0f} | {result["p99"]:.0f} | {result["errors"]} | {rss:.0f} |', flush=True)
        print(f'Peak server RSS: {memory_kb(server.pid)["VmHWM"] / 1024:.0f} MB')
    finally:
        server.terminate()
        server.wait(timeout=30)
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


if __name__ == '__main__':
    main()
