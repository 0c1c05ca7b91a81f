"""The ShapesWorld demo: a tiny owl learns procedurally drawn scenes on CPU, end to end.

It uses the library the way a user does and the library never imports it:

  tiny          the tiny owl (also configs/tiny.py): the model every stage trains
  scenes        draws the scenes and writes their captions, questions and answers
  dataset       the scenes as a TFDS dataset (+ its tokenizer): `python -m owl_jax.demo.dataset`
  config        the main job's towers, stages, data sizes and evaluation (an ml_collections config file)
  towers        pretrains the towers the main job starts from: `python -m owl_jax.demo.towers --workdir=DIR`
  siglip        the ViT's contrastive pretraining (SigLIP's sigmoid loss) and the linear probes
  pretrained/   the committed towers: an owl params dir (LLM + ViT), its tokenizer, towers.json
  run           the main job: `python -m owl_jax.demo.run --workdir=DIR`
  report        scores, blind baselines and plots of a finished run
  vision_probe, llm_probe   research probes of the tiny towers (what each can learn, how fast)
"""
