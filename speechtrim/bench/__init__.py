"""speechtrim.bench."""
