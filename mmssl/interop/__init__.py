"""Exports into the formats other libraries load, one module per target (DESIGN.md §3: L3, beside export.py).

* ``mmssl/export.py``: any encoder as timm weights + sidecar, and a timm ``save_for_hf`` folder that
  ``transformers.AutoModel`` (its ``TimmWrapperModel``) and ``pipeline("image-feature-extraction")`` load;
* ``hf_vit.py``: a timm ViT encoder as a native ``transformers.ViTModel`` folder;
* ``hf_mae.py``: an MAE objective (encoder and decoder) as ``transformers.ViTMAEForPreTraining``;
* ``openclip.py``: a CLIP objective (both towers, temperature) as an open_clip checkpoint + model config;
* ``hf_igpt.py``: an autoregressive iGPT as ``ImageGPTForCausalImageModeling`` + ``ImageGPTImageProcessor``;
* ``hf_llava.py``: a LLaVA model as ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (``<image>`` token,
  chat template).

Each writer refuses, with :class:`Unsupported` and a message naming the setting, what its target cannot express
(rather than writing a file that loads and computes something else), and each has a ``round_trip`` function that
loads the written files with the real client and returns the largest output difference from mmssl's.
"""


class Unsupported(ValueError):
    """The model uses a setting the target format cannot express; the message names it."""
