"""The objective contract (documentation only; nothing to inherit).

An objective is a plain ``torch.nn.Module``:

* ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]`` with a scalar ``"loss"``. Other 0-dim tensors in
  the output are logged as metrics; larger tensors (predictions, masks) are returned for callers and pictures.
* Batch keys are the data contract: ``"image"`` (B, 3, H, W) normalised; ``"label"`` (B,) int64 when the data
  has labels; method-specific keys (``"view1"``/``"view2"``, ``"text"``) where a method needs them.
* Optional ``no_weight_decay() -> set[str]``: parameter names (as in ``named_parameters()``) excluded from
  weight decay, on top of every 1-D parameter (norms, biases).
* Optional ``visualize(batch, denormalize) -> dict[str, Tensor]``: named (B, 3, H, W) images in [0, 1], drawn
  side by side into the run directory; ``denormalize`` maps the batch's normalised images to [0, 1].
* Optional ``after_optimizer_step() -> None``: called after each optimizer step (e.g. clamping a temperature).
* Optional ``"tokens"`` output: a 0-dim count of the tokens the batch fed the model (iGPT palette tokens, LLaVA
  text tokens); the training system logs tokens/s from it (``mmssl/throughput.py``).
* Optional ``flops_per_sample() -> int | None``: training FLOPs (forward + backward) per sample, counted as in
  ``mmssl/flops.py``; the training system logs MFU from it on GPUs. None or absent: no MFU.
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
