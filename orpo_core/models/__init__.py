"""Models and tokenizers: where a model comes from (:mod:`.sources`: Hub id, folder, GGUF, packaged
name, ``tiny``), the locally built tiny model (:mod:`.tiny`), chat formats (:mod:`.chatml`,
:mod:`.chat`) and loading for training or evaluation (:mod:`.loading`: dtype, LoRA / QLoRA, saving)."""
