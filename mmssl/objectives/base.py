"""The objective contract (documentation, and the batch keys; nothing to inherit).

An objective is a plain ``torch.nn.Module``:

* ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]`` with a scalar ``"loss"``. Other 0-dim tensors in
  the output are logged as metrics; larger tensors (predictions, masks) are returned for callers and pictures.
* Batch keys are the data contract, declared once in :data:`BATCH_KEYS` below: each key has one meaning and
  one type everywhere (data pipeline, objectives, evaluation; a test holds every reader and writer to it).
* Optional ``no_weight_decay() -> set[str]``: parameter names (as in ``named_parameters()``) excluded from
  weight decay, on top of every 1-D parameter (norms, biases).
* Optional ``visualize(batch, denormalize, generator) -> dict[str, Tensor]``: named (B, 3, H, W) images in
  [0, 1], drawn side by side into the run directory; ``denormalize`` maps the batch's normalised images to
  [0, 1]. Every random draw (masks, samples) comes from ``generator``, a ``torch.Generator`` on the batch's
  device: the same generator seed gives the same pictures, and pictures drawn during training neither
  read nor move the global generators that the training step draws from.
* Optional ``after_optimizer_step() -> None``: called after each optimizer step (e.g. clamping a temperature).
* Optional ``"tokens"`` output: a 0-dim count of the tokens the batch fed the model (iGPT palette tokens, LLaVA
  text tokens); the training system logs tokens/s from it (``mmssl/throughput.py``).
* Optional ``flops_per_sample() -> int | None``: training FLOPs (forward + backward) per sample, counted as in
  ``mmssl/flops.py``; the training system logs MFU from it on GPUs. None or absent: no MFU.
* Optional ``_no_split_modules``: names of block classes, besides the timm / open_clip / transformers blocks
  found on their own, that ``trainer.strategy=fsdp`` makes its sharding units (``factory/fsdp.py``).
* ``backbone``: the encoder being pretrained, a ``mmssl.backbones`` backbone (``embed_dim``, ``forward_pooled``,
  ``forward_tokens``; its timm model at ``.backbone.model``). Every objective that trains an image encoder
  exposes it under this name: evaluation (``eval/``: features, linear probe, kNN, online probes) and export
  (``export.py``: the state dict keys ``objective.backbone.model.*`` become the timm weights) rely on it.
  An encoder that is not a timm model (iGPT's ``IGPTEncoder``) has the same attributes plus ``num_layers`` and
  ``forward_pooled_layers(images, layers)`` for per-layer features; evaluation reads it, export to timm and
  fine-tuning refuse it, continued pretraining (``backbone.weights``) needs a timm backbone.

Objectives never import Lightning, so they work in any training loop::

    loss = objective({"image": images})["loss"]
    loss.backward()
"""

# key -> what a batch holds under it (B = batch size). Views make the image keys; SampleDecoder + ApplyView
# (data/shards.py, data/transforms.py) make the others from a shard's .cls, .txt and .json members.
BATCH_KEYS: dict[str, str] = {
    "image": "(B, 3, H, W) float, normalised: the one view of most objectives",
    "view1": "(B, 3, H, W) float, normalised: first random view of each image (SimCLR)",
    "view2": "(B, 3, H, W) float, normalised: second random view of the same images",
    "label": "(B,) int64 class index, when the shards have one (.cls)",
    "caption": "list[str] of B captions, when the shards have them (.txt)",
    "tokens": "(B, L) int64 caption token ids, made in the data workers by the objective's tokenizer",
    "json": "list of B decoded .json objects (LLaVA conversations)",
    "has_image": "(B,) bool, when samples may lack a picture: False marks a placeholder image (text-only LLaVA)",
}
