"""owl_jax.data: datasets (TFDS -> ArrayRecord) and the resumable grain input pipeline.

Build the data (nothing is downloaded)::

    python -m owl_jax.data.prepare --jsonl=FILE[,FILE] --images=DIR --out=DIR     # owl_jsonl
    python -m owl_jax.demo.dataset --out=DIR                                       # the demo's shapesworld

Read it in training::

    from owl_jax.data import make_iterator
    it = make_iterator(config.data)          # process index/count default to jax's
    batch = next(it)                         # dict of numpy arrays, fixed shapes (pipeline.py)
    state = it.get_state()                   # JSON-able; it.set_state(state) resumes exactly
    # orbax: ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)) and, on restore,
    #        data=grain.checkpoint.CheckpointRestore(it)

``config.data`` fields (`pipeline.default_config()` gives them all with these defaults):

====================== ====================== ===============================================
dataset                'owl_jsonl'            TFDS name under dataset_dir: owl_jsonl, or
                                              shapesworld (the demo's, owl_jax.demo.dataset)
dataset_dir            ''                     the --out of prepare
split                  'train'                owl_jsonl: train, validation; shapesworld:
                                              captions_{train,test}, instructions_{train,test},
                                              text_train
tokenizer_path         ''                     '' -> <dataset_dir>/tokenizer if it exists (the
                                              demo's); else a LLaMA tokenizer dir or .model file
batch_size             8                      global; per process batch_size // process_count
max_len                256                    tokens per row (BOS, placeholders included)
max_images_per_batch   8                      global image slots M; per process M // count
max_videos_per_batch   0                      global clip slots V (the video model); 0: no
                                              clip keys, a sample with a clip is skipped
frames_per_video       4                      frames a clip slot holds (the release's 4); a
                                              sample with longer stored clips is skipped
image_size             224                    images are resized to this at load
image_token_count      65                     placeholders per <image> (num queries + 1)
augment                False                  train: random resized crop (else bicubic resize)
crop_scale_min         0.5                    random resized crop area scale lower bound
horizontal_flip        False                  random flip, only with augment (breaks reading
                                              and left/right: keep off for ShapesWorld)
text_only_ratio        -1.0                   < 0: natural order; in [0, 1]: fraction of
                                              text-only samples (paper stage 2: 0.5)
shuffle                True                   reshuffled every epoch
num_epochs             0                      0: forever; else finite (last batch filled)
seed                   0                      shuffle, mixing and augmentation seed
blank_images           False                  every image replaced by zeros (the mean colour):
                                              the "does it use the image" control
text_only              False                  drop every image and its "Human: <image>" line:
                                              text-only conversations (language pretraining)
packing                False                  several samples a row, first fit (pipeline.py):
                                              batch_size counts rows; give the images slots
                                              for the samples a row holds
return_index           False                  add "index" int32[B]: record index (-1: filler;
                                              packing: int32[B, T], per token)
read_threads           2                      grain ReadOptions.num_threads
read_buffer_size       32                     grain ReadOptions.prefetch_buffer_size
worker_count           0                      grain mp_prefetch processes (0: in-process)
worker_buffer_size     2                      batches buffered per worker
====================== ====================== ===============================================

Modules: `conversation` (template, prompts), `tokenizer` (load/train), `text` (token layout and
loss masks), `image` (decode, repair, CLIP preprocessing), `video` (the video model's clips: the
release's frame sampling, decoded by PyAV, the `video` extra), `records` (record layout, reading),
`owl_jsonl` (the TFDS builder of the released JSONL format), `pipeline` (the iterator),
`batching` (samples into rows and batches, packing), `prepare` (command line). The demo's
ShapesWorld builder lives in `owl_jax.demo.dataset`.
"""

_LAZY = {
    "make_iterator": "owl_jax.data.pipeline",
    "make_batch": "owl_jax.data.batching",
    "default_config": "owl_jax.data.pipeline",
    "OwlDataIterator": "owl_jax.data.pipeline",
    "load_tokenizer": "owl_jax.data.tokenizer",
    "build_conversation": "owl_jax.data.conversation",
    "build_prompt": "owl_jax.data.conversation",
    "encode_conversation": "owl_jax.data.text",
    "encode_prompt": "owl_jax.data.text",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'owl_jax.data' has no attribute {name!r}")
