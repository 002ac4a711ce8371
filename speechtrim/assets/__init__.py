"""speechtrim.assets."""
