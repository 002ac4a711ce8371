"""speechtrim.hf."""
