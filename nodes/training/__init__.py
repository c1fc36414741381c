"""LoRA training inside ComfyUI: DreamBooth-LoRA with prior preservation, LiDB, rank-relaxed fast
finetune and B-LoRA blocks (issue #6). ``train.train_lora`` is the entry point; see its modules:

* ``data``            images / folder / latents → latents (resize/crop rule)
* ``conditioning``    prompts → ``apply_model`` inputs per batch row
* ``targets``         which layers train (presets, B-LoRA blocks, rank check)
* ``parameterisation`` standard LoRA, LiDB, rank-relaxed (+ SVD export)
* ``session``         attach/detach the trainable residual on a MODEL clone (hooks, wrappers)
* ``prior``           class latents generated with the base model
* ``loop``            loss, optimiser, progress, checkpoints, interrupt/OOM
* ``result``          kohya LoRA entry, checkpoints, loss curve image
"""
