"""Every constant of deep-speaker in one place: audio, features, model, training, evaluation, paths.

"mfcc" in names (read_mfcc, build-mfcc-cache, sample_from_mfcc) means the normalised 64-filter fbank features:
the names are the original implementation's, kept for its users. Imports nothing of deep-speaker.
"""

import os

# Audio and features.
SAMPLE_RATE = 16000  # Hz: every file is resampled to this rate, mono.
NUM_FBANKS = 64  # mel filters per frame.
FRAME_LENGTH_S = 0.025  # 25 ms analysis window.
FRAME_STEP_S = 0.010  # 10 ms hop.
NFFT = 512  # FFT size of each frame.
PREEMPHASIS = 0.97  # python_speech_features' default pre-emphasis coefficient.
SILENCE_PERCENTILE = 95  # samples louder than this percentile of |x| mark the start and end of speech.
NORMALIZE_EPSILON = 1e-12  # floor of a frame's standard deviation.
FBANK_BLOCK_FRAMES = 4096  # frames transformed at once (about 17 MB of spectra): long files stay bounded.
AUDIO_EXTENSIONS = ('.flac', '.wav', '.ogg', '.mp3')  # formats libsndfile reads: folder scans and uploads.
CONVERTIBLE_EXTENSIONS = ('.m4a',)  # VoxCeleb2's AAC: libsndfile cannot read it; a cache build says how to convert.
MANIFEST_HEADER = ('path', 'speaker')  # the columns of a CSV manifest (build-mfcc-cache --manifest).

# Augmentation (cache variants).
AUGMENTED_MARK = '~'  # in a cached speaker or utterance name: an augmented copy (excluded from evaluation).
SPEED_FACTORS = (0.9, 1.1)  # speed perturbation; each factor makes new speaker identities.
SNR_RANGE_DB = (5.0, 20.0)  # additive noise at an SNR drawn uniformly from this range.
CHANNEL_AUGMENTATIONS = ('reverb', 'telephone', 'babble', 'white')  # build-mfcc-cache --augment.
RT60_RANGE_S = (0.2, 1.0)  # reverb: synthetic room responses of a random reverberation time.
TELEPHONE_RATE = 8000  # Hz: telephone band resampling rate.
TELEPHONE_BAND_HZ = (300.0, 3400.0)  # band-pass before the codec.
TELEPHONE_LEVEL_DB = (-30.0, -3.0)  # peak level (dBFS) the codec sees: its quantisation noise depends on it.
MU_LAW_MU = 255  # 8-bit mu-law (G.711).
CHANNEL_SNR_RANGE_DB = (5.0, 15.0)  # babble and white noise of --augment.
BABBLE_TALKERS = (3, 6)  # other training utterances summed into babble, inclusive.

# Model inputs.
NUM_FRAMES = 160  # frames per training crop: 1.6 s.
TRAIN_TEST_RATIO = 0.8  # per speaker: first 80 % of utterances (or of the frames of a lone utterance) for training.
COUNTS_PER_SPEAKER = (600, 100)  # crops per speaker in kx_train / kx_test.
MIN_TRAINING_SPEAKERS = 2  # a softmax needs two classes, a triplet a negative of another speaker.

# Packed feature store (store.py) and the window sampler (sampler.py, train-model --sampler windows).
PACKED_DTYPES = ('float16', 'float32')  # frames of the store: float16 halves its size (README: accuracy).
DEFAULT_PACKED_DTYPE = 'float16'
PACKED_FORMAT = 1  # version of the store's files; another version is refused.
PACK_STATE_EVERY_S = 2.0  # seconds between two saves of a pack's progress (what a killed pack resumes from).
SAMPLERS = ('fixed', 'windows')  # train-model --sampler: build-keras-inputs crops, or windows of the store.
SPEAKER_SAMPLINGS = ('balanced', 'proportional')  # speakers equally often, or in proportion to their utterances.
HELD_OUT_FRACTION = 0.02  # of each speaker's utterances held out for validation (at least 2, keeping one).
VALIDATION_WINDOWS_PER_UTTERANCE = 8  # windows drawn once from each held-out utterance ...
MAX_VALIDATION_WINDOWS = 1920  # ... up to this many in all (20 batches of 96).

# Model.
EMBEDDING_SIZE = 512
RESCNN_FILTERS = (64, 128, 256, 512)  # one stage each; scaled by --width.
CLIPPED_RELU_MAX = 20.0
L2_WEIGHT_DECAY = 1e-4
SOFTMAX_DROPOUT = 0.5
TDNN_FRAME_LAYERS = ((512, 5, 1), (512, 3, 2), (512, 3, 3), (512, 1, 1), (1500, 1, 1))  # (units, kernel, dilation)
STATS_POOLING_EPSILON = 1e-5  # added to the variance before the square root.
GRU_UNITS = 1024
GRU_LAYERS = 3
ECAPA_CHANNELS = 1024  # C of Desplanques et al. 2020 (published: 512 and 1024); scaled by --width.
ECAPA_MFA_CHANNELS = 1536  # multi-layer feature aggregation output (the paper's, for either C).
ECAPA_BOTTLENECK = 128  # squeeze-excitation and attention bottlenecks.
ECAPA_DILATIONS = (2, 3, 4)  # one SE-Res2Block each, kernel 3.
ECAPA_KERNELS = (5, 3)  # first frame layer, SE-Res2Blocks.
ECAPA_RES2_SCALE = 8  # Res2Net groups; the channels are rounded to a multiple of it.

# Classification losses (losses.py): cosine logits with a margin on the target class.
CLASSIFICATION_LOSSES = ('softmax', 'amsoftmax', 'aamsoftmax')
DEFAULT_LOSS = 'softmax'  # the original recipe.
AM_SOFTMAX_MARGIN = 0.2  # cos(theta) - m (Wang et al. 2018 used 0.35 on faces; speaker recipes 0.1-0.3).
AAM_SOFTMAX_MARGIN = 0.2  # cos(theta + m), radians (ECAPA-TDNN, Desplanques et al. 2020).
MARGIN_SCALE = 30.0  # s: both papers.
MARGIN_RANGE = (0.0, 1.0)  # accepted margins: 0 <= m < 1 (cosine units for AM, radians for AAM).
SCALE_RANGE = (1.0, 100.0)  # accepted scales: 1 <= s <= 100.

# SpecAugment (train-model --spec_augment): masks of each training crop, filled with 0 (a normalised frame's mean).
SPEC_AUGMENT_TIME_MASKS = (2, 10)  # (masks, most frames each) of NUM_FRAMES.
SPEC_AUGMENT_FREQ_MASKS = (2, 8)  # (masks, most fbank channels each) of NUM_FBANKS.

# Training.
BATCH_SIZE = 96  # 32 triplets in the triplet phase.
SOFTMAX_LEARNING_RATE = 1e-3
TRIPLET_LEARNING_RATE = 1e-3
TRIPLET_MOMENTUM = 0.9
TRIPLET_ALPHA = 0.1  # margin of the triplet loss, on cosine similarities.
TRIPLET_VALIDATION_BATCHES = 8
TRIPLET_MINING_MODES = ('hard', 'semihard', 'random')
DEFAULT_TRIPLET_MINING = 'semihard'  # best EER of the three in the README's measurements.
MINING_HISTORY_SIZE = 6400  # crops embedded for mining; 25,600 suits a GPU.
MINING_REFRESH_EVERY = 50  # batches between two re-embeddings of the history.
EARLY_STOPPING_PATIENCE = 20
REDUCE_LR_PATIENCE = 10
REDUCE_LR_FACTOR = 0.5
MIN_LEARNING_RATE = 1e-5
EARLY_STOPPING_MIN_DELTA = 0.001  # smaller changes of the monitored value are not improvements.
DEFAULT_EPOCHS = 1000  # total epochs of a phase: early stopping ends it first.
TRIPLET_STEPS_PER_EPOCH = 100  # batches per triplet epoch (a softmax epoch is one pass over kx_train).
TRIPLET_PREFETCH_BATCHES = 2  # triplet batches built ahead of the training step.

# Speaker-level validation (validation.py, train-model --val_speakers) and checkpoint averaging (--average_last).
VALIDATION_SEED = 20170701  # fixed: the held-out speakers depend only on their number (N=10 is within N=20).
VALIDATION_TARGETS_PER_SPEAKER = 4  # utterances (or segments of a lone utterance) embedded per held-out speaker.
VALIDATION_SEGMENT_FRAMES = 300  # a lone utterance is cut into non-overlapping segments of at least 3 s.
VALIDATION_SPEAKERS_FILE = 'validation-speakers.json'  # in a phase's checkpoint dir: the speakers held out.
EMBEDDING_LAYER = 'affine'  # the layer whose (L2-normalised) output is the embedding, softmax head or not.
EPOCH_CHECKPOINT_DIGITS = 4  # <Model>_epoch0007.keras: the epoch checkpoints --average_last keeps.

# Several devices and machines (distribute.py): train-model --distribute, --mixed_precision.
DISTRIBUTE_MODES = ('none', 'mirrored', 'multiworker')  # one device; a machine's GPUs; the machines of TF_CONFIG.
TF_CONFIG_ENV = 'TF_CONFIG'  # TensorFlow's cluster description for multi-worker training.
WORKER_SEED_STRIDE = 1_000_003  # worker i draws its batches with seed + i * this.
COLLECTIVE_TIMEOUT_S = 120.0  # seconds a multi-worker collective operation waits for the other workers.
MIXED_PRECISION_POLICY = 'mixed_float16'  # Keras' policy: float16 computations, float32 weights.
GPU_ENV = 'DEEP_SPEAKER_GPU'  # ./deep-speaker setup installs TensorFlow's CUDA build when this is 1 (or --gpu).

# Inference (embedding.embed_crops): crops per forward pass. Evaluation and trial lists use this; the mining
# history refresh uses the training batch (train-model --inference_batch lowers it).
INFERENCE_BATCH_SIZE = 64

# Evaluation (original protocol).
NUM_NEGATIVE_SPEAKERS = 99
EVAL_THRESHOLD_STEP = 0.001

# Evaluation on trial lists.
WINDOW_HOP = 80  # frames between two windows of a whole-utterance embedding (50 % overlap).
EMBEDDING_FILES_PER_CHUNK = 32  # utterances whose windows go through one predict call.
FEATURE_THREADS = 2  # threads reading and featurising the next chunk of files while the model runs.
DCF_P_TARGET = 0.01

# Score normalisation (score_norm.py, eval-trials --score_norm).
SCORE_NORMS = ('none', 'mean', 'asnorm')
ASNORM_TOP = 100  # top cohort scores per side; about 40 % of a 251-speaker cohort (train-clean-100).
COHORT_UTTERANCES_PER_SPEAKER = 4  # cached utterances averaged into one cohort embedding per speaker.

# TensorFlow's start-up notices (tf_startup.py keeps them out of a normal run).
TENSORFLOW_STARTUP_NOTICES = ('WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
                              '] oneDNN custom operations are on.')

# Speaker toolkit (speaker.py): embed, verify, enrol, identify, cluster.
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models')
DEFAULT_CHECKPOINT = os.path.join(MODELS_DIR, 'ResCNN-w0.25-librispeech100.keras')  # shipped: see the README.
CALIBRATION_SUFFIX = '.calibration.json'  # <checkpoint>.calibration.json: thresholds eval-trials measured.
OPERATING_POINTS = ('eer', 'min_dcf')  # the calibrated thresholds: at the EER, at minDCF(DCF_P_TARGET).
FINGERPRINT_HASH_CHARS = 12  # hex digits of the weights' SHA-256 in a model fingerprint.
LIST_FILE_EXTENSIONS = ('.txt', '.lst', '.scp')  # an input with one of these suffixes lists audio files.
MAX_SPEAKER_NAME_LENGTH = 100  # characters.
UNKNOWN_SPEAKER = 'unknown'  # identify's answer when no enrolled speaker reaches the threshold.
DEFAULT_TOP_K = 5  # candidates identify returns per file.

# Speaker service (service.py, cli.py serve).
SERVICE_HOST = '127.0.0.1'  # loopback only unless --host says otherwise.
SERVICE_PORT = 8000
SERVICE_MAX_UPLOAD_MB = 20.0  # request body limit (all uploads of one request), MB of 10**6 bytes.
SERVICE_MAX_SECONDS = 60.0  # longest accepted recording, seconds.
SERVICE_QUEUE_SIZE = 8  # model jobs waiting behind the one running; more get 503.
SERVICE_TOKEN_ENV = 'DEEP_SPEAKER_TOKEN'  # environment variable of the bearer token (--token overrides it).

# Working directory layout.
DEFAULT_WORKING_DIR = os.path.expanduser('~/.deep-speaker-wd')
CACHE_SUBDIR = 'audio-fbanks'
SKIPPED_FILES_REPORT = 'skipped-files.txt'
SKIPPED_FILES_SHARD_REPORT = 'skipped-files-{index}-of-{count}.txt'  # build-mfcc-cache --shard K/N: one per part.
CACHE_JOBS_PER_WORKER = 16  # chunks of work per pool worker: balance against per-chunk overhead.
MAX_CACHE_CHUNK = 64  # files per chunk at most, so the progress bar moves on large corpora.
CACHE_WORKER_BLAS_THREADS = 1  # per cache build worker: the workers fill the cores (see audio.worker_pool).
CACHE_FORMAT_FILE = 'cache-format'  # in CACHE_SUBDIR: the naming scheme of the cached files.
CACHE_FORMAT = '2'  # 2: <speaker>/<path under the speaker folder, extension kept, escaped>.npy; 1 (no file): stem.
VERIFY_BLOCK_FRAMES = 65536  # frames of a cached array checked for NaN at once (16 MB).
MIN_FILE_SAMPLE_RATE = 1000  # Hz: a file declaring less is refused (resampling it up would explode its size).
KERAS_INPUTS_SUBDIR = 'keras-inputs'
PACKED_SUBDIR = 'packed'  # the packed feature store: frames.npy, index.npz, utterances.txt, meta.json.
CHECKPOINTS_SOFTMAX_DIR = 'checkpoints-softmax'
CHECKPOINTS_TRIPLET_DIR = 'checkpoints-triplets'
PHASE_DIRS = {'softmax': CHECKPOINTS_SOFTMAX_DIR, 'triplet': CHECKPOINTS_TRIPLET_DIR}  # checkpoints of each phase.
INPUTS_META = 'meta.json'  # in KERAS_INPUTS_SUBDIR: what the model inputs were built from.
CHECKPOINT_STATE_ENTRY = 'deep_speaker_state.json'  # the training state inside each _last.keras archive.
TRAINING_LOCK = '.train.lock'  # in a phase's checkpoint dir: the pid of the run training it.
SKIPPED_TRIALS_SUFFIX = '.skipped.txt'  # eval-trials: TRIALS_STEM.skipped.txt lists the undecodable files.
FILE_KIND_HEAD_BYTES = 512  # bytes read to tell what a checkpoint file is (signature, text or binary).
HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'  # first bytes of .h5 and .weights.h5 checkpoints.
ZIP_SIGNATURE = b'PK\x03\x04'  # first bytes of .keras checkpoints.
LOGS_SUBDIR = 'logs'
DEFAULT_SEED = 123

# Export, clustering and plots.
TSNE_PERPLEXITY = 30.0  # t-SNE's effective number of neighbours; clipped below the number of points.
TSNE_SEED = 0  # t-SNE's random state: the same embeddings give the same picture.
EXPORT_FORMATS = ('savedmodel', 'tflite')  # export --format: a SavedModel directory or OUT/model.tflite.
