"""recipes/train_gpu_jax.py's two steps that run here: `pack` (a feature cache as 8-bit frames, degraded copies cut
short) and `restore` (float16 weights by layer name back into a .keras checkpoint that eval-trials reads). Its
`train` step needs JAX, which this environment does not have; it ran on the lent GPU (README)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from checkpoints import build_model
from constants import NUM_FBANKS, NUM_FRAMES
from conv_models import MODELS
from embedding import embed_crops

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location('train_gpu_jax', ROOT / 'recipes' / 'train_gpu_jax.py')
train_gpu_jax = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(train_gpu_jax)


def test_pack_quantises_frames_and_cuts_degraded_copies(tmp_path):
    rng = np.random.default_rng(0)
    cache = tmp_path / 'wd' / 'audio-fbanks'
    arrays = {('b', 'u1.npy'): rng.standard_normal((500, NUM_FBANKS)) * 3,
              ('b', 'u1~reverb.npy'): rng.standard_normal((500, NUM_FBANKS)),
              ('a', 'u2.npy'): rng.standard_normal((200, NUM_FBANKS)),
              ('a', 'u2~telephone.npy'): rng.standard_normal((200, NUM_FBANKS))}
    for (speaker, name), frames in arrays.items():
        (cache / speaker).mkdir(parents=True, exist_ok=True)
        np.save(cache / speaker / name, frames.astype(np.float32))
    out = tmp_path / 'features.npz'
    result = subprocess.run([sys.executable, 'recipes/train_gpu_jax.py', 'pack', '--degraded_fraction', '0.5',
                             str(tmp_path / 'wd'), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    packed = np.load(out)
    # Store order: speakers sorted, then names; a degraded copy keeps half its frames, never fewer than a window.
    assert packed['speakers'].tolist() == ['a', 'b']
    assert packed['labels'].tolist() == [0, 0, 1, 1]
    assert packed['degraded'].tolist() == [False, True, False, True]
    assert packed['lengths'].tolist() == [200, NUM_FRAMES, 500, 250]
    assert packed['frames'].dtype == np.uint8 and packed['frames'].shape == (1110, NUM_FBANKS)
    restored = (packed['frames'].astype(np.float32) - 128) / train_gpu_jax.QUANTUM
    first = arrays[('a', 'u2.npy')]
    assert np.abs(restored[:200] - first).max() <= 0.5 / train_gpu_jax.QUANTUM + 1e-6
    loud = arrays[('b', 'u1.npy')]  # values beyond the 8-bit range are clipped to it
    clipped = np.clip(loud, -128 / train_gpu_jax.QUANTUM, 127 / train_gpu_jax.QUANTUM)
    assert np.abs(restored[200 + NUM_FRAMES:700 + NUM_FRAMES] - clipped).max() <= 0.5 / train_gpu_jax.QUANTUM + 1e-6
    assert (np.abs(loud) > 8).any()


def test_restore_writes_a_checkpoint_that_embeds_as_the_trained_model(tmp_path):
    loss = 'aamsoftmax'
    trained = MODELS['tdnn'](include_softmax=True, num_speakers_softmax=5, head='cosine', width=0.125).m
    rng = np.random.default_rng(1)
    trained.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.1 for w in trained.get_weights()])
    np.savez(tmp_path / f'TDNN-{loss}-seed1_30.npz', **train_gpu_jax.float16_weights(trained))
    (tmp_path / f'TDNN-{loss}-seed1.json').write_text(json.dumps(
        {'model': 'tdnn', 'options': {'width': 0.125}, 'loss': loss, 'speakers': 5}))
    checkpoint = tmp_path / 'restored.keras'
    result = subprocess.run([sys.executable, 'recipes/train_gpu_jax.py', 'restore',
                             str(tmp_path / f'TDNN-{loss}-seed1_30.npz'), str(checkpoint)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    restored = build_model(str(checkpoint))
    assert restored.name == 'TDNN'
    original = MODELS['tdnn'](width=0.125)
    original.m.set_weights([w.astype(np.float16).astype(np.float32) for w in trained.get_weights()[:-len(
        trained.layers[-1].weights)]])
    crops = rng.standard_normal((4, NUM_FRAMES, NUM_FBANKS, 1)).astype(np.float32)
    np.testing.assert_allclose(embed_crops(restored.m, crops), embed_crops(original.m, crops), atol=1e-5)
