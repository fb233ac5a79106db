"""LoRA adapters applied from outside the model: `lora` (the layer, applying and merging), `peft_format`
(adapters on disk in the peft layout), `merge` (the `dsvl2 merge` verb)."""
