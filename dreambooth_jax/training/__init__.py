"""DreamBooth training pieces: instance/class data, the rare-token identifier, LoRA."""
