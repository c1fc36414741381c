"""Hypernetwork → LoRA (HyperDreamBooth / LoRA of Change): LiDB space, networks, file format, training.

Modules, one job each:

* ``lidb``        the LiDB parameterisation (frozen random aux matrices, materialisation to LoRA factors)
* ``network``     the hypernetwork: image tokens → transformer decoder → LiDB weights
* ``file_format`` the ``.safetensors`` hypernet file (config in metadata) and its strict reader
* ``generate``    running a loaded hypernet on ``CLIP_VISION_OUTPUT``s → a LORA_SET entry
* ``examples``    reading a training folder and projecting target LoRAs onto LiDB space
* ``training``    the training loop (weight-space, LoRA-reverse and diffusion losses)
* ``loss_curve``  the loss-curve IMAGE

Nothing here imports ComfyUI at module level except where a module needs ``comfy.*`` to do its job,
so ``lidb`` can be imported (and its aux matrices regenerated) without ComfyUI.
"""
